"""Chaos benchmark: SIGKILL at seeded random moments, then a rerun; the final outputs must be byte-identical to
an uninterrupted run's.

    python benchmarks/bench_chaos.py [--cycles 20] [--seed 0] [--workloads extract,train-mil,train-cdm,generate-large]
                                     [--work DIR] [--keep]

Workloads (tiny inputs made once under ``--work``):

- ``extract``: two concurrent ``extract`` processes on one folder (3 synthetic 2048-px slides, toy encoder, 20x+5x);
  both are killed, then both rerun;
- ``train-mil``: a 3-fold ``train-mil --seeds 1,2`` run (mean-pooling head, 12 planted slides, 2 epochs);
- ``train-cdm``: ``train-cdm`` of the tiny DiT on contexts of the tiny ZoomLDM (checkpoint every 2 steps);
- ``generate-large``: ``generate-large --n 2`` (joint sampler, 2 steps) with the tiny ZoomLDM and the toy conditioner.

Each workload first runs uninterrupted into its run folder (the reference: sha256 of every output file, timing
T). Each cycle empties the folder, starts the command(s) in their own process group, sends SIGKILL to the group
at a moment drawn uniformly from [0.05 T, 0.95 T] by ``random.Random(seed)``, reruns to completion (exit 0),
and compares every output file with the reference (logs and progress records excluded: they hold times).
A cycle passes when the same files exist with the same bytes. Prints one Markdown row per workload.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("extract", "train-mil", "train-cdm", "generate-large")
# files that legitimately differ between runs (wall-clock times, logger output): not compared
VOLATILE = ("logs/", "lightning_logs/", "metrics.csv", "hparams.yaml", ".log", "errors.csv", "claims/", ".claim",
            "records/")


def _cli(*argv) -> list[str]:
    return [sys.executable, "-m", "cli", *map(str, argv)]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    return env


def _run(argv: list[str], fork: bool = False, log: Path | None = None) -> None:
    """Make an input: ``python -m cli ...`` or ``python -c CODE``, as a fresh process or (``fork``) a forked one."""
    if fork:
        child = Forked(argv, log)
        code, err = child.wait(), child.read_log()
    else:
        done = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True)
        code, err = done.returncode, done.stderr
    if code != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {code}: {err.strip().splitlines()[-3:]}")


def _tiny_zoomldm(work: Path, fork: bool = False) -> Path:
    """A tiny ZoomLDM checkpoint with seeded random weights (what prepare-cdm and generate-large load)."""
    path = work / "zoomldm_tiny.ckpt"
    if not path.is_file():
        _run([sys.executable, "-c", "import torch; from zoomfeat.model import build_zoomldm; "
              "from zoomfeat.resolve import tiny_config_path; torch.manual_seed(0); "
              f"build_zoomldm(tiny_config_path()).save_official({str(path)!r})"], fork, work / "setup.log")
    return path


def setup(name: str, work: Path, small: bool = False, fork: bool = False) -> dict:
    """Inputs of a workload (made once) and its command: {"argv": [...], "procs": k, "run": folder}; ``small``:
    the test suite's version (2 slides of 1024 px, 1 epoch)."""
    run = work / name / "run"
    if name == "extract":
        cohort = work / "cohort"
        if not (cohort / "labels.csv").is_file():
            _run(_cli("synth", "--out", cohort, "--n", 2 if small else 3, "--size", 1024 if small else 2048,
                      "--seed", 3), fork, work / "setup.log")
        argv = _cli("extract", cohort, "--out", run, "--encoder", "toy", "--mags", "20x,5x", "--device", "cpu",
                    "--workers", 0, "--batch-size", 16)
        return {"argv": argv, "procs": 2, "run": run}
    if name == "train-mil":
        data = work / "mil"
        if not (data / "labels.csv").is_file():
            _run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); "
                  "from mil_data import planted_cohort; "
                  f"planted_cohort(__import__('pathlib').Path({str(data)!r}), n_slides=12, dim=4, sizes=(4, 7), "
                  "folds=3)"], fork, work / "setup.log")
        argv = _cli("train-mil", "--features", f"{data / 'feats'}@20x", "--labels", data / "labels.csv", "--splits",
                    data / "splits", "--out", run, "--model", "mean", "--model-kwargs", '{"hidden": 4}',
                    "--epochs", 1 if small else 2, "--lr", "1e-2", "--seeds", "1,2")
        return {"argv": argv, "procs": 1, "run": run}
    if name == "train-cdm":
        weights = _tiny_zoomldm(work, fork)
        cohort, trainset, ctx = work / "cdm_cohort", work / "cdm_trainset", work / "cdm_contexts"
        if not (cohort / "labels.csv").is_file():
            _run(_cli("synth", "--out", cohort, "--n", 2, "--size", 2048, "--seed", 5), fork, work / "setup.log")
        if not (trainset / "index.h5").is_file():
            _run(_cli("prepare-train", cohort, "--out", trainset, "--conditioner", "toy", "--zoomldm", "tiny",
                      "--mags", "20x,5x", "--max-patches-per-mag", 2, "--batch-size", 16), fork, work / "setup.log")
        if not (ctx / "contexts.h5").is_file():
            _run(_cli("prepare-cdm", "--data", trainset, "--zoomldm", "tiny", "--weights", weights, "--out", ctx,
                      "--batch-size", 4, "--workers", 0, "--device", "cpu"), fork, work / "setup.log")
        argv = _cli("train-cdm", "--data", ctx, "--out", run, "--size", "DiT-S", "--depth", 1, "--hidden-size", 32,
                    "--num-heads", 2, "--batch-size", 4, "--workers", 0, "--accelerator", "cpu", "--devices", 1,
                    "--max-steps", 8, "--every-n-steps", 2, "--resume", "auto", "--log-every-n-steps", 1)
        return {"argv": argv, "procs": 1, "run": run, "outputs": ("official/",)}
    if name == "generate-large":
        weights = _tiny_zoomldm(work, fork)
        cohort = work / "cohort"
        if not (cohort / "labels.csv").is_file():
            _run(_cli("synth", "--out", cohort, "--n", 2 if small else 3, "--size", 1024 if small else 2048,
                      "--seed", 3), fork, work / "setup.log")
        slide = sorted(cohort.glob("*.svs"))[0]
        argv = _cli("generate-large", "--zoomldm", "tiny", "--weights", weights, "--slide", slide, "--mag", "10x",
                    "--method", "joint", "--conditioner", "toy", "--steps", 2, "--device", "cpu", "--n", 2,
                    *(("--no-refine", "--x", 256, "--y", 256) if small else ()), "--out", run)
        return {"argv": argv, "procs": 1, "run": run}
    raise SystemExit(f"unknown workload {name!r}: use {', '.join(WORKLOADS)}")


def digest(run: Path, outputs: tuple[str, ...] | None = None) -> dict[str, str]:
    out = {}
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run).as_posix()
        if not path.is_file() or any(v in rel for v in VOLATILE):
            continue
        if outputs is not None and not rel.startswith(outputs):
            continue
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


class Forked:
    """A command run by ``cli.main`` in a child forked from this process (which has imported torch already): a
    real process that SIGKILL ends at any instruction, without the seconds of interpreter and torch start-up a
    fresh ``python -m cli`` spends before the command's first line. The test suite's version runs this way so
    that every kill lands in the command's work, not in its imports; stderr goes to ``log``."""

    def __init__(self, argv: list[str], log: Path):
        self.log = log
        self.pid = os.fork()
        if self.pid == 0:  # the child: its own process group (killed as one), stdout dropped, stderr to the log
            code = 70
            try:
                os.setpgid(0, 0)
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.dup2(fd, 2)
                sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
                if argv[1] == "-c":
                    exec(compile(argv[2], "<chaos setup>", "exec"), {"__name__": "__main__"})
                    code = 0
                else:
                    import cli

                    code = cli.main([str(a) for a in argv[3:]])
                sys.stdout.flush()
                sys.stderr.flush()
            except BaseException as exc:  # noqa: BLE001  (a crash is reported through the log and the status)
                try:
                    os.write(2, f"{type(exc).__name__}: {exc}\n".encode())
                except OSError:
                    pass
            finally:
                os._exit(code)
        try:  # also here: a kill sent before the child ran its first line still finds the group
            os.setpgid(self.pid, self.pid)
        except (ProcessLookupError, PermissionError):
            pass
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def read_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


# what the forked commands import (the parent imports it once, so no child spends seconds importing it)
FORK_IMPORTS = ("cli", "lightning", "torchmetrics", "h5py", "openslide", "sklearn.metrics", "zoomfeat.extract.runner",
                "mil.cv", "mil.train", "zoomfeat.model", "zoomfeat.generate.run", "zoomfeat.generate.joint",
                "zoomfeat.cdm.train")


def warm_imports() -> None:
    import importlib

    for name in FORK_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional module this checkout lacks: its children import what they need
            pass


def _start(spec: dict) -> list:
    if spec.get("fork"):
        logs = spec["run"].parent / "stderr"
        logs.mkdir(parents=True, exist_ok=True)
        return [Forked(spec["argv"], logs / f"proc{k}.log") for k in range(spec["procs"])]
    return [subprocess.Popen(spec["argv"], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
            for _ in range(spec["procs"])]


def _finish(procs: list) -> list[tuple[int, str]]:
    return [(p.wait(), p.read_log() if isinstance(p, Forked) else p.stderr.read()) for p in procs]


def reference(spec: dict) -> tuple[dict[str, str], float]:
    shutil.rmtree(spec["run"], ignore_errors=True)
    start = time.perf_counter()
    results = _finish(_start(spec))
    seconds = time.perf_counter() - start
    bad = [(rc, err.strip().splitlines()[-1:]) for rc, err in results if rc != 0]
    if bad:
        raise RuntimeError(f"reference run of {spec['argv'][3]} failed: {bad}")
    return digest(spec["run"], spec.get("outputs")), seconds


def cycle(spec: dict, ref: dict[str, str], seconds: float, rng: random.Random) -> tuple[bool, str]:
    """One kill-and-rerun cycle; (passed, what happened)."""
    shutil.rmtree(spec["run"], ignore_errors=True)
    at = rng.uniform(0.05, 0.95) * seconds
    procs = _start(spec)
    time.sleep(at)
    killed = 0
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    _finish(procs)
    rerun = _finish(_start(spec))
    failed = [(rc, err.strip().splitlines()[-1:]) for rc, err in rerun if rc != 0]
    if failed:
        return False, f"kill at {at:.1f}s ({killed} killed): rerun failed {failed}"
    got = digest(spec["run"], spec.get("outputs"))
    if got != ref:
        differ = sorted(k for k in set(got) | set(ref) if got.get(k) != ref.get(k))
        return False, f"kill at {at:.1f}s ({killed} killed): {len(differ)} files differ, e.g. {differ[:3]}"
    return True, f"kill at {at:.1f}s ({killed} killed): identical ({len(got)} files)"


def chaos(workloads, cycles: int, seed: int, work: Path, verbose: bool = True, small: bool = False,
          fork: bool = False) -> dict[str, dict]:
    """``fork``: run every command in a child forked from this process (:class:`Forked`) instead of a fresh
    ``python -m cli`` (the test suite's version: no start-up, so the kills land in the commands' work)."""
    results = {}
    if fork:
        warm_imports()
    for name in workloads:
        spec = {**setup(name, work, small, fork), "fork": fork}
        ref, seconds = reference(spec)
        rng = random.Random(f"{seed}-{name}")
        passed, notes = 0, []
        for k in range(cycles):
            ok, note = cycle(spec, ref, seconds, rng)
            passed += ok
            notes.append(note)
            if verbose:
                print(f"  {name} cycle {k + 1}/{cycles}: {'ok' if ok else 'FAIL'} - {note}", file=sys.stderr)
        results[name] = {"cycles": cycles, "passed": passed, "reference_s": seconds, "files": len(ref),
                         "notes": notes}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--work", type=Path, default=None, help="folder for inputs and runs (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep --work afterwards")
    args = parser.parse_args()
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="zoomfeat-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = chaos([w.strip() for w in args.workloads.split(",") if w.strip()], args.cycles, args.seed, work)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("| workload | processes | reference run (s) | output files | cycles | identical after rerun |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        procs = 2 if name == "extract" else 1
        print(f"| {name} | {procs} | {r['reference_s']:.1f} | {r['files']} | {r['cycles']} | {r['passed']} |")
    if any(r["passed"] != r["cycles"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
