"""`vdsh bench parallel`'s table: speed-ups against the method's own serial layouts, never across methods."""

import pytest

from vdsh.app.bench.parallel import layouts, table


def test_layouts_compare_the_parallel_run_with_both_serial_uses_of_its_cores():
    assert layouts(2) == [(1, 1), (1, 2), (2, 1)]
    assert layouts(4) == [(1, 1), (1, 4), (4, 1)]


def test_table_speed_ups_are_per_method_against_one_thread_and_the_best_serial_layout():
    rows = [{"method": "replay", "processes": 1, "threads": 1, "epoch_s": 4.0, "comm_s": 0.0, "map": 0.5},
            {"method": "replay", "processes": 1, "threads": 2, "epoch_s": 2.5, "comm_s": 0.0, "map": 0.5},
            {"method": "replay", "processes": 2, "threads": 1, "epoch_s": 2.0, "comm_s": 0.1, "map": 0.5},
            {"method": "admm", "processes": 1, "threads": 1, "epoch_s": 10.0, "comm_s": 0.0, "map": 0.6},
            {"method": "admm", "processes": 2, "threads": 1, "epoch_s": 8.0, "comm_s": 1.0, "map": 0.6}]
    lines = table(rows).splitlines()
    assert lines[4] == "| features replay | 2 × 1 | 2.000 | 0.100 | 2.00× | 1.25× | 0.500 |"
    assert lines[6] == "| VDSH ADMM (consensus) | 2 × 1 | 8.000 | 1.000 | 1.25× | 1.25× | 0.600 |"


def test_bad_method_is_a_clear_error():
    from vdsh.app.bench.parallel import bench_parallel

    with pytest.raises(ValueError, match="--methods"):
        bench_parallel(methods="replay,sgd")


def test_epoch_time_is_the_median_epoch_of_the_cumulative_history():
    from vdsh.app.bench.parallel import median_epoch

    assert median_epoch([{"time": 5.0}, {"time": 7.0}, {"time": 9.5}]) == 2.5  # epochs of 5, 2 and 2.5 s
