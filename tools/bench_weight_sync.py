"""Weight sync time: over a process group (rollout.weight_sync=distributed) vs through disk, same model, same run.

    python tools/bench_weight_sync.py [--hidden 512 --layers 8 --vocab 32000 --repeats 5 --bucket-mb 64]

Builds a random Qwen2 checkpoint in a temporary directory (nothing downloaded), starts one `megaent serve` on
it (CPU, gloo), loads the same checkpoint as the trainer's policy in this process (TP = 1) and perturbs it,
then times, interleaved so load changes on a shared machine hit both sides alike:
- `distributed`: `sync_weights_distributed` (pause, begin, buckets of HF tensors broadcast over gloo while
  /update_weights_from_distributed receives them, end, continue; the group is joined in the warm-up);
- `disk`: `sync_weights_disk` (`save_hf` to a temporary directory, then pause, flush,
  /update_weights_from_disk, continue), what rollout.weight_sync=disk does.
Checks once that the server then holds the trainer's weights bit for bit (/get_weights_by_name). Reports
the medians of `--repeats` runs after one warm-up each: a table `name ours ref ratio` (ours = distributed,
ref = disk), then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

# the same checkpoint builder and interleaved timer as the rollout bench (tools/ is on sys.path when run)
from bench_rollout import build_checkpoint, timed_pair


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bucket-mb", type=float, default=64.0, help="bucket size of the distributed sync")
    p.add_argument("--threads", type=int, default=1, help="torch threads here and in the server")
    a = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    torch.set_num_threads(a.threads)

    import httpx

    from megaent.model import load_hf
    from megaent.parallel import destroy_parallel, init_parallel
    from megaent.parallel.launch import free_port
    from megaent.rollout.client import SGLangClient
    from megaent.rollout.launcher import launch_megaent
    from megaent.rollout.weight_sync import DistWeightSync, sync_weights_disk, sync_weights_distributed

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = build_checkpoint(Path(tmp) / "m", a)
        server = launch_megaent(str(hf_dir), ports=[free_port()], env={"OMP_NUM_THREADS": str(a.threads)},
                                timeout_s=600)
        state = init_parallel(1, 1)
        sender = None
        try:
            policy = load_hf(str(hf_dir), state)
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for t in policy.parameters():
                    t.add_(torch.randn(t.shape, generator=g) * 0.01)
            nbytes = sum(t.numel() * t.element_size() for t in policy.parameters())
            client = SGLangClient(server.urls)
            sender = DistWeightSync(client, backend="gloo", master_address="127.0.0.1", master_port=free_port(),
                                    bucket_bytes=int(a.bucket_mb * 2**20))
            step = iter(range(10**6))
            dist_s, disk_s = timed_pair(
                lambda: sync_weights_distributed(policy, state, sender, weight_version=f"d{next(step)}"),
                lambda: sync_weights_disk(policy, state, Path(tmp) / "w", client, weight_version=f"f{next(step)}"),
                a.repeats)
            sync_weights_distributed(policy, state, sender, weight_version="check")
            name = "model.layers.0.self_attn.q_proj.weight"
            served = torch.tensor(httpx.post(server.urls[0] + "/get_weights_by_name", timeout=120,
                                             json={"name": name, "truncate_size": 10**9}).json())
            q = dict(policy.named_parameters())["layers.0.attn.qkv.weight"].detach()[:served.shape[0]]
            assert torch.equal(served, q.float()), "the server does not hold the trainer's weights"
        finally:
            if sender is not None:
                sender.close()
            server.stop()
            destroy_parallel()
    print(f"model: {nbytes / 2**20:.1f} MiB fp32 ({a.layers} layers, hidden {a.hidden}, vocab {a.vocab}), "
          f"buckets of {a.bucket_mb:g} MiB, {a.threads} thread(s), median of {a.repeats}")
    print(f"{'name':<24}{'ours':>10}{'ref':>10}{'ratio':>8}")
    print(f"{'sync_s (dist vs disk)':<24}{dist_s:>10.3f}{disk_s:>10.3f}{dist_s / disk_s:>8.2f}")
    print(json.dumps({"bench": "weight_sync", "model_mib": round(nbytes / 2**20, 1), "distributed_s": round(dist_s, 4),
                      "disk_s": round(disk_s, 4), "ratio": round(dist_s / disk_s, 3), "repeats": a.repeats,
                      "bucket_mb": a.bucket_mb, "threads": a.threads}))


if __name__ == "__main__":
    main()
