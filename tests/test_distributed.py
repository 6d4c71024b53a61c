"""Multi-process training (torchrun, gloo on the CPU): 2 ranks x batch 1 == 1 process x batch 2."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file


def _job(folder, name: str, batch: int):
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "job.toml"
    config.write_text(f'concepts = "demo"\n[settings]\nname = "{name}"\nsteps = 3\nresolution = 64\nbatch_size = {batch}\n'
                      'checkpoint_every = 2\nunet_lr = 0.001\ntoken_lr = 0.01\n')
    return config


def test_two_ranks_train_like_one_process_with_the_world_batch(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", UNCONFUSED_QUIET="1")
    single = _job(tmp_path / "single", "single", 2)
    subprocess.run([sys.executable, "-m", "unconfused", "lora", "--config", str(single)], check=True, env=env,
                   capture_output=True, timeout=300)
    multi = _job(tmp_path / "multi", "multi", 1)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29533", "-m", "unconfused", "lora", "--config", str(multi)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    a = load_file(tmp_path / "single" / "models" / "loras" / "single.safetensors")
    b = load_file(tmp_path / "multi" / "models" / "loras" / "multi.safetensors")
    assert a.keys() == b.keys()
    # Adam divides by sqrt(v): float-level gradient differences (summation order) grow to ~1e-4
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    ups = [k for k in a if k.endswith("lora_up.weight")]  # zero-free after 3 steps of lr 1e-3 from gaussian init
    moved = max(float(a[k].abs().max()) for k in ups)
    print(f"2 ranks vs 1 process: max abs diff {diff:.2e}, largest trained lora_up value {moved:.2e}")
    assert diff < 1e-3 and moved > 20 * diff
    ea = load_file(tmp_path / "single" / "models" / "embeddings" / "single_red-thing.safetensors")["clip_l"]
    eb = load_file(tmp_path / "multi" / "models" / "embeddings" / "multi_red-thing.safetensors")["clip_l"]
    assert torch.allclose(ea, eb, atol=1e-3)
    # only rank 0 wrote checkpoints: one run folder, no duplicates
    runs = tmp_path / "multi" / "output" / "unconfused" / "runs" / "multi"
    assert sorted(p.name for p in runs.glob("step_*.pt")) == ["step_000002.pt", "step_000003.pt"]
