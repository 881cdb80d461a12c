"""Spawned gloo CPU process groups for the context-parallel tests.

``run_ranks`` starts `world` processes (start method "spawn", a file store, gloo, one intra-op
thread each); every process runs ``body(*args)``, which returns its report as a list of
"name:ok|FAIL:..." strings, written to a per-rank report file that the parent reads and asserts on
(an exception in a process is reported as "EXCEPTION" with its traceback). `body` must be a
module-level function (it is pickled into the children).
"""

import gc
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, store_path, report_path, body, args):
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
        torch.set_num_threads(1)
        report = body(*args)
        with open(f"{report_path}.{rank}", "w") as f:
            f.write(" ".join(report))
    except Exception:  # noqa: BLE001 - surfaced to the parent through the report file
        with open(f"{report_path}.{rank}", "w") as f:
            f.write("EXCEPTION " + traceback.format_exc())
    finally:
        # free what still holds the group (reference cycles such as a model and the policy hooked
        # into it) before destroying it, not at interpreter exit after the other ranks have gone
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(tmp_path, world: int, name: str, body, *args) -> None:
    """Run ``body(*args)`` on `world` spawned gloo processes; assert no rank reports FAIL or EXCEPTION."""
    store, errors = tmp_path / f"store-{name}-{world}", tmp_path / f"errors-{name}-{world}"
    mp.start_processes(_worker, args=(world, str(store), str(errors), body, args),
                       nprocs=world, join=True, start_method="spawn")
    for rank in range(world):
        text = open(f"{errors}.{rank}").read()
        assert "FAIL" not in text and "EXCEPTION" not in text, f"rank {rank}: {text}"
