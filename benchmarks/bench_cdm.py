"""CDM step and sampling time: the tiny DiT and DiT-B, our training step against the bare network calls.

    python benchmarks/bench_cdm.py [--sizes tiny,DiT-B] [--batch 8] [--repeats 5] [--threads 2] [--device cpu]

Per size, median seconds (after one warm-up) of:

- ``bare step``: the reference a training step replaces: DiT forward, a plain MSE on its output, backward,
  AdamW step (no diffusion, no EMA);
- ``CDM step``: ``CDMLightning.losses`` (t / noise draws, q_sample, hybrid loss mse + vb) + backward + AdamW +
  the EMA update, i.e. everything of a Lightning training step except the Trainer's own bookkeeping;
- ``bare sample`` / ``sample_contexts``: N forwards of the DiT vs the respaced DDIM sampler with N steps.

Random weights; contexts [B, 65, D] with D = 64 (tiny, the golden model) or 512 (DiT-B, the released ZoomLDM).
Prints Markdown rows.
"""

from __future__ import annotations

import argparse
import statistics
import time

SIZES = {"tiny": dict(in_channels=64, hidden_size=64, depth=2, num_heads=4),
         "DiT-S": dict(in_channels=512, hidden_size=384, depth=12, num_heads=6),
         "DiT-B": dict(in_channels=512, hidden_size=768, depth=12, num_heads=12)}


def _median_time(fn, repeats: int, device: str) -> float:
    import torch

    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(size: str, batch: int, repeats: int, device: str, sample_steps: int) -> dict[str, float]:
    import torch

    from zoomfeat.cdm.config import OptimSection
    from zoomfeat.cdm.dit import DiTConfig
    from zoomfeat.cdm.module import CDM, CDMLightning
    from zoomfeat.cdm.sample import LoadedCDM, sample_contexts

    torch.manual_seed(0)
    cfg = DiTConfig(**SIZES[size])
    model = CDM(cfg).to(device)
    module = CDMLightning(model, OptimSection())
    opt = torch.optim.AdamW(model.dit.parameters(), lr=1e-4, weight_decay=0)
    x = torch.randn(batch, cfg.in_channels, cfg.num_tokens, device=device)
    y = torch.randint(0, 8, (batch,), device=device)
    batch_dict = {"contexts": x.transpose(1, 2).cpu(), "mags": y.cpu(), "cond": torch.zeros(batch, 0)}
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (batch,), device=device)

    def bare_step():
        out = model.dit(x, t, y)
        loss = (out[:, :cfg.in_channels] - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def cdm_step():
        loss = module.losses(batch_dict, gen)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_ema()

    model.dit.train()
    row = {"params_M": sum(p.numel() for p in model.dit.parameters()) / 1e6,
           "bare_step": _median_time(bare_step, repeats, device), "cdm_step": _median_time(cdm_step, repeats, device)}
    model.dit.eval()
    cdm = LoadedCDM(model.dit, None, "", [])

    def bare_sample():
        with torch.no_grad():
            for k in range(sample_steps):
                model.dit(x, torch.full((batch,), k, device=device), y)

    row["bare_sample"] = _median_time(bare_sample, max(1, repeats // 2), device)
    row["sample"] = _median_time(lambda: sample_contexts(cdm, "5x", batch, steps=sample_steps, batch_size=batch),
                                 max(1, repeats // 2), device)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,DiT-B", help=f"comma-separated of {', '.join(SIZES)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sample-steps", type=int, default=20)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"| size | params (M) | batch | bare step s | CDM step s | ratio | {args.sample_steps} bare forwards s "
          "| sample_contexts s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        r = measure(size, args.batch, args.repeats, args.device, args.sample_steps)
        print(f"| {size} | {r['params_M']:.2f} | {args.batch} | {r['bare_step']:.4f} | {r['cdm_step']:.4f} | "
              f"{r['cdm_step'] / r['bare_step']:.2f} | {r['bare_sample']:.3f} | {r['sample']:.3f} | "
              f"{r['sample'] / r['bare_sample']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
