"""`fasttrain demo` (`make demo`): the whole pipeline on SYNTHETIC phantoms, in minutes on 2 CPU cores.

Stages, each through the same code a real run uses (only the sizes in configs/demo/*.yaml shrink):
  1. generate phantoms in the NIH and in the CheXpert source layouts (fasttrain.converters.synthetic;
     the hard family by default: signs that need shape and context, see synthetic_hard.py)
  2. convert each to raw + ffcv at 64 px by its real converter     (converters.nih, converters.chexpert)
  3. pre-train a small MAE teacher on the NIH + CheXpert mixture   (fasttrain pretrain, data.path=A,B)
  4. distil a smaller student from it (ETMAE), on the same mixture (fasttrain pretrain --teacher)
  5. pre-train the same student without the teacher (MAE only), equal steps: the control
  6. fine-tune the distilled student on the 14 labels (fasttrain finetune, best.pt by val mAUC)
  7. evaluate on the test split, with bootstrap CIs  (fasttrain evaluate), plot (fasttrain plot), and
     linear-probe the frozen encoders side by side: random init, MAE only, distilled, the teacher
     (fasttrain probe)
The images are synthetic and every number printed says so.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from fasttrain.config import build_config
from fasttrain.converters.chexpert import convert_chexpert
from fasttrain.converters.nih import convert_nih
from fasttrain.converters.synthetic import generate_phantoms, subgroup_effect_text
from fasttrain.converters.synthetic_hard import DIFFICULTIES, drawer
from fasttrain.data import open_packed
from fasttrain.eval.calibration import format_calibration
from fasttrain.eval.evaluate import evaluate_checkpoint, format_table
from fasttrain.eval.plots import plot_runs
from fasttrain.eval.probe import ProbeSettings, run_probe
from fasttrain.eval.subgroups import format_subgroups
from fasttrain.train.finetune import run_finetune
from fasttrain.train.pretrain import run_pretrain

MARKER = ".fasttrain-demo"  # only a folder holding this is ever deleted (a re-run starts clean)


def configs_dir() -> Path:
    d = Path(__file__).resolve().parents[2] / "configs" / "demo"
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: the demo configs are missing (run the demo from a fasttrain checkout)")
    return d


def _stage_overrides(args) -> list[str]:
    over = []
    if args.epochs is not None:
        over.append(f"--optim.epochs={args.epochs}")
    if args.max_steps is not None:
        over.append(f"--run.max_steps={args.max_steps}")
    if args.quiet:
        over.append("--run.progress=false")
    return over


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fasttrain demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo)")
    p.add_argument("--n", type=int, default=4000, help="number of phantoms to generate (NIH layout)")
    p.add_argument("--n-chexpert", type=int, default=None,
                   help="phantoms in the CheXpert layout, the mixture's second part (default n / 3)")
    p.add_argument("--src-size", type=int, default=128, help="phantom size in the source layout (px)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", choices=DIFFICULTIES, default="hard",
                   help="phantom family (default hard: a random encoder's probe stays near chance, so the "
                        "probes can tell pre-training and distillation apart; easy: large contrasty signs and "
                        "a deliberate subgroup effect)")
    p.add_argument("--epochs", type=int, default=None, help="override every stage's epochs (tests)")
    p.add_argument("--max-steps", type=int, default=None, help="stop every stage after N steps (tests)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the test CIs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for the training stages (default 1: see run_demo)")
    args = p.parse_args(argv)
    try:
        return run_demo(args)
    except Exception as e:  # keep the user-facing line short; the traceback follows on stderr
        print(f"fasttrain demo: failed: {type(e).__name__}: {e}", file=sys.stderr)
        raise


def run_demo(args) -> int:

    t_all, cpu_all = time.perf_counter(), time.process_time()
    out = Path(args.out)
    if out.exists():
        if not (out / MARKER).is_file():
            raise FileExistsError(f"{out} exists and is not a demo folder; choose another --out")
        shutil.rmtree(out)  # a previous demo: start clean, every stage is re-run
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by `fasttrain demo`; SYNTHETIC data only\n")
    cfgs = configs_dir()
    over = _stage_overrides(args)
    rows: list[tuple[str, str, str]] = []  # (stage, images/s, note)

    def banner(text: str) -> None:
        print(f"\n=== {text} ===", flush=True)

    n_cx = args.n_chexpert if args.n_chexpert is not None else max(args.n // 3, 20)
    draw = drawer(args.difficulty)
    banner(f"1/7 generating SYNTHETIC {args.difficulty} phantoms ({args.src_size} px): {args.n} in the NIH "
           f"source layout, {n_cx} in the CheXpert source layout")
    t = time.perf_counter()
    src = generate_phantoms(out / "phantoms_src", args.n, seed=args.seed, size=args.src_size,
                            workers=None, progress=not args.quiet, draw=draw)
    # another seed: the CheXpert-layout part holds other images, as a second source would
    src_cx = generate_phantoms(out / "phantoms_chexpert_src", n_cx, seed=args.seed + 1, size=args.src_size,
                               workers=None, progress=not args.quiet, layout="chexpert", draw=draw)
    rows.append(("generate phantoms", f"{(args.n + n_cx) / (time.perf_counter() - t):,.0f}", f"{src}, {src_cx}"))

    banner("2/7 converting with the NIH and the CheXpert converters -> raw + ffcv, 64 px")
    t = time.perf_counter()
    packed = convert_nih(src, out / "packed", formats=("raw", "ffcv"), size=64, val_fraction=0.1,
                         seed=args.seed, progress=not args.quiet)
    packed_cx = convert_chexpert(src_cx, out / "packed_chexpert", formats=("raw", "ffcv"), size=64, val_fraction=0.1,
                                 seed=args.seed, progress=not args.quiet)
    # Pre-training reads both parts as one mixture (NIH 14 labels, CheXpert 5: MAE ignores them).
    # Weights 3:1 and an epoch the size of NIH's train split keep the demo's pre-training cost
    # that of NIH alone while every batch mixes both sources.
    n_train = len(open_packed(packed, "train"))
    mixture = [f"--data.path={packed},{packed_cx}", "--data.weights=[3,1]", f"--data.samples_per_epoch={n_train}"]
    # The demo's models are tiny, so a step is bound by per-op overhead, not FLOPs: one intra-op
    # thread runs it as fast as two, and leaves the other core to the loader's prefetch thread
    # (with two, the step and the loader fight over both cores: 3-10x slower on our shared 2-core machine).
    torch.set_num_threads(args.threads)
    rows.append(("convert (raw+ffcv)", f"{(args.n + n_cx) / (time.perf_counter() - t):,.0f}",
                 f"{packed}, {packed_cx}"))

    def pretrain(yaml: str, run: str, *extra: str) -> dict:
        """One pre-training stage on the mixture: configs/demo/<yaml>, run folder out/<run>."""
        cfg = build_config(cfgs / yaml, mixture + [f"--run.out={out / run}", f"--run.seed={args.seed}", *extra] + over)
        return run_pretrain(cfg)

    banner("3/7 pre-training the MAE teacher on the NIH + CheXpert mixture")
    teacher = pretrain("teacher.yaml", "teacher")
    rows.append(("pretrain teacher (MAE)", _ips(teacher), _loss_note(teacher)))

    banner("4/7 distilling the student from the teacher (ETMAE) on the mixture")
    student = pretrain("student.yaml", "student", f"--distill.teacher_ckpt={teacher['last']}")
    rows.append(("distil student (ETMAE)", _ips(student), _loss_note(student)))

    banner("5/7 pre-training the same student without the teacher (MAE only, same steps): the control")
    student_mae = pretrain("student.yaml", "student_mae")
    rows.append(("student MAE only", _ips(student_mae), _loss_note(student_mae)))

    banner("6/7 fine-tuning the distilled student on the 14 labels")
    cfg = build_config(cfgs / "finetune.yaml", [f"--data.path={packed}", f"--run.out={out / 'finetune'}",
                                                f"--model.init={student['last']}", f"--run.seed={args.seed}"] + over)
    ft = run_finetune(cfg)
    best = ft["best"] or ft["last"]
    val = f"best val mAUC {ft['best_val_mauc']:.3f}" if ft["best_val_mauc"] is not None else "no val mAUC"
    rows.append(("fine-tune student", _ips(ft), val))

    banner("7/7 evaluating the fine-tuned student on the test split; linear probes of the frozen encoders")
    # subgroups by the phantoms' sex / age / view (the easy family draws women's signs fainter on
    # purpose: converters/synthetic.py SUBGROUP_EFFECT), calibration with a temperature fitted on val
    res = evaluate_checkpoint(best, packed, "test", out / "finetune" / "eval", n_boot=args.bootstrap, seed=args.seed,
                              by=["sex", "age", "view"], calibrate=True)
    rows.append(("evaluate (test)", f"{res['images_per_s']:,.0f}", f"{res['n_images']} images"))
    probes = _probes(out, packed, cfgs, args, {"teacher": teacher, "student": student, "student_mae": student_mae})
    rows.append(("linear probes (4 encoders)", "-", f"{probes['seconds']:.0f} s"))
    plots = plot_runs([out / "teacher", out / "student", out / "student_mae", out / "finetune"], out / "plots")

    wall = time.perf_counter() - t_all
    print("\n" + "=" * 78)
    print("fasttrain demo -- SYNTHETIC PHANTOMS, not real radiographs: these numbers only show that")
    print("the pipeline learns; they say nothing about clinical performance.")
    print("=" * 78)
    w = max(len(r[0]) for r in rows)
    print(f"{'stage'.ljust(w)}  {'images/s':>9}  note")
    for stage, ips, note in rows:
        print(f"{stage.ljust(w)}  {ips:>9}  {note}")
    print()
    print(format_table(res, f"student (ViT {cfg.model.embed_dim}-d x {cfg.model.depth}) on the SYNTHETIC test split, "
                            f"{res['n_images']} images, 95% bootstrap CI ({args.bootstrap} resamples)"))
    print()
    print(format_probes(probes["rows"], res, args.bootstrap))
    print()
    print(format_calibration(res["calibration"]))
    print()
    print(f"subgroups of the SYNTHETIC test split (deliberate effect: {subgroup_effect_text(draw)}; underdiagnosis: "
          f"a positive study with every label below its Youden threshold on val)")
    print(format_subgroups(res["subgroups"]))
    print()
    print(f"checkpoints: teacher {teacher['last']}\n             student {student['last']}\n"
          f"             student (MAE only) {student_mae['last']}\n             classifier {best}")
    print(f"results:     {res['paths']['results']}\nROC curves:  {res['paths']['roc']}\n"
          f"reliability: {res['paths']['reliability']}")
    print("plots:       " + "\n             ".join(str(pth) for pth in plots))
    print(f"wall time:   {wall / 60:.1f} min (CPU time of the main process {(time.process_time() - cpu_all) / 60:.1f} min; "
          f"{torch.get_num_threads()} torch threads)")
    return 0


# (label, which encoder) of the probe table, in the order printed
PROBED = (("random init (student architecture)", None), ("student, MAE only", "student_mae"),
          ("student, distilled (ETMAE)", "student"), ("teacher (MAE)", "teacher"))


def _probes(out: Path, packed: Path, cfgs: Path, args, runs: dict) -> dict:
    """Linear probes (`fasttrain probe` defaults, seed args.seed) of the frozen encoders, on the NIH
    part's train -> test split: {"rows": [(label, result)], "seconds": wall}."""
    t = time.perf_counter()
    rows = []
    for label, run in PROBED:
        settings = ProbeSettings(seed=args.seed)
        if run is None:
            r = run_probe(None, packed, random_init=True, config=str(cfgs / "student.yaml"),
                          out=out / "probe_random_init", n_boot=args.bootstrap, settings=settings)
        else:
            r = run_probe(runs[run]["last"], packed, out=out / run / "probe", n_boot=args.bootstrap, settings=settings)
        rows.append((label, r))
    return {"rows": rows, "seconds": time.perf_counter() - t}


def format_probes(rows: list[tuple[str, dict]], finetuned: dict, n_boot: int) -> str:
    """The probe table, then the fine-tuned student's test mAUC beside them."""
    w = max(len(label) for label, _ in rows + [("student, distilled, fine-tuned", None)])
    lines = [f"linear probes of the frozen encoders and the fine-tuned student, SYNTHETIC test split "
             f"({n_boot} bootstrap resamples; one seed: differences inside the CIs are noise)",
             f"{'encoder'.ljust(w)}  test mAUC           95% CI"]
    for label, r in rows:
        lines.append(f"{label.ljust(w)}  {r['mauc'] or float('nan'):9.3f}   {_ci(r):>16}  (linear probe)")
    lines.append(f"{'student, distilled, fine-tuned'.ljust(w)}  {finetuned['mauc'] or float('nan'):9.3f}   "
                 f"{_ci(finetuned):>16}  (whole encoder + head)")
    return "\n".join(lines)


def _ci(res: dict) -> str:
    ci = res.get("mauc_ci95")
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _ips(summary: dict) -> str:
    v = summary.get("images_per_s")
    return f"{v:,.0f}" if v else "-"


def _loss_note(summary: dict) -> str:
    f = summary.get("final") or {}
    if "loss_mae" not in f:
        return ""
    note = f"final L_MAE {f['loss_mae']:.3f}"
    if f.get("loss_dist"):
        note += f", L_dist {f['loss_dist']:.3f}"
    return note


if __name__ == "__main__":
    from fasttrain import cli  # the exception table; cli imports this module lazily
    sys.exit(cli.main(["demo", *sys.argv[1:]]))
