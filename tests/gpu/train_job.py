#!/usr/bin/env python3
"""A deterministic, self-judging training job for slurm_mm's GPU-under-Slurm run.

It trains a small MLP with SGD + momentum for `--steps` steps on data generated from the
step number (fixed seeds, deterministic kernels), so an uninterrupted run and a run that
was checkpointed, preempted, suspended or restored end with bit-identical weights.
Beside the model it keeps `--ballast-gb` of a known pattern on the GPU and a step
counter both on the GPU and in Python; at the end it checks all three itself
(zdtm style) and writes one JSON result (final weight checksum, counters, verdicts).

Progress goes to stdout only (one line every `--report` steps, with the wall time):
the job holds no other file open, so an image never pins a file that grows later.
Without torch (the CPU machine's dry run) the same loop runs in plain Python floats.

    train_job.py --steps 1500 --result DIR/result.json [--ballast-gb 1] [--sleep 0.03]
Exit: 0 all checks passed, 4 a self-check failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

SEED = 20261128


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--result", required=True, help="where the final JSON result goes")
    p.add_argument("--ballast-gb", type=float, default=0.0, help="GPU memory of known pattern")
    p.add_argument("--sleep", type=float, default=0.0, help="pause per step (paces the run)")
    p.add_argument("--report", type=int, default=50, help="progress line every N steps")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu", "python"))
    args = p.parse_args(argv)
    if args.steps <= 0 or args.report <= 0 or args.width <= 0 or args.ballast_gb < 0:
        p.error("--steps, --report and --width must be positive, --ballast-gb not negative")
    return args


def say(text: str) -> None:
    print(f"{time.time():.3f} {text}", flush=True)


def write_result(path: str, result: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(result, handle, indent=1, sort_keys=True)
    os.replace(tmp, path)


# ---------------------------------------------------------------- torch (GPU or CPU)

def run_torch(args: argparse.Namespace, device: str) -> dict:
    import torch  # noqa: PLC0415

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    w = args.width
    model = torch.nn.Sequential(
        torch.nn.Linear(w, 4 * w), torch.nn.Tanh(), torch.nn.Linear(4 * w, w)).to(device)
    teacher = torch.randn(w, w, generator=torch.Generator().manual_seed(SEED + 1)).to(device) / w ** 0.5
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    n = int(args.ballast_gb * (1 << 30)) // 8
    pattern_key = 0x5DEECE66D
    ballast = None
    if n:
        ballast = torch.arange(n, dtype=torch.int64, device=device)
        ballast.bitwise_xor_(pattern_key)
    gpu_step = torch.zeros((), dtype=torch.int64, device=device)
    say(f"ready device={device} width={w} ballast_gb={args.ballast_gb} pid={os.getpid()}")

    loss_value = 0.0
    for step in range(1, args.steps + 1):
        gen = torch.Generator(device=device).manual_seed(SEED + step)
        x = torch.randn(256, w, generator=gen, device=device)
        y = torch.tanh(x @ teacher)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        gpu_step += 1
        if step % args.report == 0 or step == args.steps:
            loss_value = float(loss.detach())
            say(f"step={step} gpu_step={int(gpu_step)} loss={loss_value:.6f}")
        if args.sleep:
            time.sleep(args.sleep)

    digest = hashlib.sha256()
    for tensor in list(model.state_dict().values()) + [
            s for group in opt.state.values() for s in group.values() if torch.is_tensor(s)]:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    ballast_ok = True
    bad = 0
    if ballast is not None:
        expect = torch.arange(n, dtype=torch.int64, device=device).bitwise_xor_(pattern_key)
        bad = int((ballast != expect).sum())
        ballast_ok = bad == 0
    return {"checksum": digest.hexdigest(), "gpu_step": int(gpu_step), "loss": loss_value,
            "ballast_ok": ballast_ok, "ballast_bad_elements": bad, "device": device}


# ---------------------------------------------------------------- plain Python (dry run)

def run_python(args: argparse.Namespace) -> dict:
    import random  # noqa: PLC0415

    w = min(args.width, 16)
    rnd = random.Random(SEED)
    weights = [[rnd.uniform(-0.1, 0.1) for _ in range(w)] for _ in range(w)]
    teacher = [[rnd.uniform(-1, 1) / w for _ in range(w)] for _ in range(w)]
    velocity = [[0.0] * w for _ in range(w)]
    ballast = bytearray(int(args.ballast_gb * (1 << 30)))
    for i in range(0, len(ballast), 4096):
        ballast[i] = (i // 4096) & 0xFF
    counter = [0]  # the "device" counter, kept apart from the loop variable
    say(f"ready device=python width={w} ballast_gb={args.ballast_gb} pid={os.getpid()}")
    loss = 0.0
    for step in range(1, args.steps + 1):
        data = random.Random(SEED + step)
        x = [data.uniform(-1, 1) for _ in range(w)]
        y = [sum(t * v for t, v in zip(row, x)) for row in teacher]
        out = [sum(a * v for a, v in zip(row, x)) for row in weights]
        err = [o - t for o, t in zip(out, y)]
        loss = sum(e * e for e in err) / w
        for i in range(w):
            for j in range(w):
                velocity[i][j] = 0.9 * velocity[i][j] + err[i] * x[j]
                weights[i][j] -= 0.02 * velocity[i][j]
        counter[0] += 1
        if step % args.report == 0 or step == args.steps:
            say(f"step={step} gpu_step={counter[0]} loss={loss:.6f}")
        if args.sleep:
            time.sleep(args.sleep)
    digest = hashlib.sha256(repr((weights, velocity)).encode()).hexdigest()
    bad = sum(1 for i in range(0, len(ballast), 4096) if ballast[i] != (i // 4096) & 0xFF)
    return {"checksum": digest, "gpu_step": counter[0], "loss": loss, "ballast_ok": bad == 0,
            "ballast_bad_elements": bad, "device": "python"}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    device = args.device
    if device == "auto":
        try:
            import torch  # noqa: PLC0415

            device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            device = "python"
    started = time.time()
    result = run_python(args) if device == "python" else run_torch(args, device)
    result.update(steps=args.steps, seconds=round(time.time() - started, 3),
                  counters_ok=result["gpu_step"] == args.steps)
    result["ok"] = result["counters_ok"] and result["ballast_ok"]
    write_result(args.result, result)
    say(f"result checksum={result['checksum']} gpu_step={result['gpu_step']} ok={result['ok']}")
    return 0 if result["ok"] else 4


if __name__ == "__main__":
    sys.exit(main())
