"""invert.py's command line: flags for the common settings, dotted overrides for everything."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable, Optional

from deqlit.cli import ArgumentParser, parse, positive_int, typed_keys
from deqlit.config import set_path
from deqlit.deq.degradations import FILLS, TASK_OPTIONS, TASKS
from deqlit.deq.inversion import INIT_ALIASES, INITS, METHODS, canonical_init
from deqlit.deq.solvers import SOLVERS, option_defaults, solvers_taking
from deqlit.devices import section_precision
from deqlit.guards import first_few, unread_flags
from deqlit.runs.inversion import run_inversion
from deqlit.runs.launch import launched_worker

FLAGS = {"method": "inversion.method", "timesteps": "inversion.timesteps", "skip": "inversion.skip",
         "eta": "inversion.eta", "num_images": "inversion.num_images",
         "batch_size": "inversion.batch_size", "lr": "inversion.lr",
         "max_steps": "inversion.max_steps", "init": "inversion.init", "seed": "inversion.seed",
         "out": "inversion.out", "ckpt": "checkpoint.path", "split": "inversion.split",
         "solver": "inversion.solver", "max_batch": "inversion.max_batch", "task": "inversion.task",
         "mask": "inversion.mask", "factor": "inversion.factor", "fill": "inversion.fill"}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Invert images with DEQ-DDIM (or the sequential "
                       "baseline). Any config key can be overridden as --section.key value, "
                       "Trainer arguments as --trainer.KEY (e.g. --trainer.accelerator gpu).")
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--timesteps", type=positive_int, help="T")
    p.add_argument("--skip", choices=["uniform", "quad"])
    p.add_argument("--eta", type=float)
    p.add_argument("--num-images", type=positive_int, dest="num_images")
    p.add_argument("--batch-size", type=positive_int, dest="batch_size")
    p.add_argument("--max-batch", type=positive_int, dest="max_batch", help="rows per network call")
    p.add_argument("--lr", type=float)
    p.add_argument("--max-steps", type=positive_int, dest="max_steps", help="optimization steps per image")
    p.add_argument("--init", choices=[*INITS, *INIT_ALIASES],
                   help="the start of the latents (random: the old name of gaussian)")
    p.add_argument("--solver", choices=list(SOLVERS), help="the DEQ method's forward solver")
    p.add_argument("--split", help="which split of the dataset to invert (default: test)")
    p.add_argument("--task", choices=TASKS, help="reconstruct (default) the whole image, or restore "
                   "it from part of it: inpaint (--mask) or super-resolution (--factor)")
    p.add_argument("--mask", help="inpaint: center (default; a centred square of 25%% of the pixels), "
                   "random:P (each pixel hidden with probability P) or a PNG file (white = known)")
    p.add_argument("--factor", type=positive_int, help="super-resolution: the average-pooling factor "
                   "(default 2)")
    p.add_argument("--fill", choices=FILLS, help="inpaint: the start's guess of the hidden pixels, the "
                   "mean of the known ones (default) or their harmonic interpolation")
    p.add_argument("--seed", type=int)
    p.add_argument("--ckpt", help="noise-network weights (default: checkpoint.path of the config)")
    p.add_argument("--out", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-progress", action="store_true", dest="no_progress")
    return p


def given(argv: list[str], args: argparse.Namespace, dest: str) -> bool:
    """Did the command line set this flag, by name (--method) or as its key (--inversion.method)?"""
    key = "--" + FLAGS[dest]
    return getattr(args, dest, None) is not None or any(a == key or a.startswith(key + "=") for a in argv)


def typed_inversion_keys(argv: list[str], args: argparse.Namespace) -> dict[str, str]:
    """{key of the inversion section: how the command line set it}, for the keys it set: by flag
    (max_steps: '--max-steps') or dotted ('--inversion.max_steps'; '--inversion.exact.tol' sets
    'exact' and 'exact.tol', as does '--inversion.exact "{tol: ...}"'). Values that come from the config file are not in it."""
    typed = {}
    for dest, key in FLAGS.items():
        if key.startswith("inversion.") and getattr(args, dest, None) is not None:
            typed[key.split(".", 1)[1]] = "--" + dest.replace("_", "-")
    for key, word in typed_keys(argv, expand_mappings=True).items():
        section, _, rest = key.partition(".")
        if section == "inversion":
            typed.setdefault(rest.split(".", 1)[0], word)
            if "." in rest:
                typed.setdefault(rest, word)
    return typed


# A restoration's start where --init names none: the one the DEQ steps improve most on the faces
# at T = 10 (4 held-out faces, 10 steps). Inpainting: not exact, which regenerates the filled image
# exactly, whose loss on the known pixels is then ~0, so the steps move nothing (hole PSNR = the
# fill's, 17.5 dB; DDIM inversion 18.1 dB; Gaussian 15.5 dB). Super-resolution: exact, which
# regenerates the bicubic upsampling, whose pooled image is not y, so the steps do move it
# (DDIM inversion starts at 18.7 dB and reaches 27.9 dB). Its 29.7 dB on those 4 faces (bicubic
# 29.3) is the start's own, kept to y: no step improves on it (below).
RESTORATION_INITS = {"inpaint": "ddim-inversion", "super-resolution": "exact"}
# Adam steps where --max-steps names none. The loss sees only what is known, so further steps fit
# it by moving the latent off the noise the model decodes well, and the hole degrades: on the 16
# held-out faces (inpaint, centre, lr 0.01) the mean hole PSNR is 16.0 dB at the start, 17.0 after
# 3 and 5 steps, 16.7 after 7, 15.8 after 10 and 13.6 after the config's 25. Super-resolution
# (2x, 16 held-out faces, whole-image PSNR of the result kept to y): the start 29.29 dB; every step
# taken (early_stop_loss 0) 29.04 / 29.00 / 29.05 dB at --max-steps 2 / 5 / 25 (lr 0.01), 29.12 and
# 29.26 at 5 with lr 0.003 and 0.001: the steps fit y and lose a little elsewhere. The default
# (early stop below 0.5 / 4 = 0.125) keeps 8 starts as they are and steps the others: 29.15 dB.
# (Unscaled, 0.5 stopped every image at the start, 29.29 dB, while saying "5 steps".)
RESTORATION_STEPS = 5
WHY_INIT = {"inpaint": "init exact would regenerate the filled image, whose loss is ~0 already, and "
                       "move nothing",
            "super-resolution": "it regenerates the bicubic upsampling, which the steps then fit to "
                                "the low-resolution image"}


def restoration_defaults(cfg: dict, args: argparse.Namespace, argv: list[str]) -> Optional[str]:
    """A restoration task's method and start where the command line chose none; returns the line
    that says what was chosen (None: nothing changed).

    The configs' default method, exact, inverts whole images and cannot restore: the DEQ gradient
    method runs instead. The start: RESTORATION_INITS[task] unless --init is given.
    """
    inv = cfg["inversion"]
    task = inv["task"]
    if task == "reconstruct" or (inv["method"] == "exact" and given(argv, args, "method")):
        return None          # nothing to choose; an explicit exact is refused by InversionSettings
    switch_method = inv["method"] == "exact" and not given(argv, args, "method")
    choose_init = not given(argv, args, "init")
    choose_steps = not given(argv, args, "max_steps") and inv["max_steps"] > RESTORATION_STEPS
    init = RESTORATION_INITS[task] if choose_init else canonical_init(inv["init"])
    changed_init = choose_init and canonical_init(inv["init"]) != init
    if switch_method:
        set_path(cfg, "inversion.method", "deq")
    if choose_init:
        set_path(cfg, "inversion.init", init)
    if choose_steps:
        set_path(cfg, "inversion.max_steps", RESTORATION_STEPS)
    if not (switch_method or changed_init or choose_steps):
        return None
    guess = "the filled image" if task == "inpaint" else "the bicubic upsampling"
    start = {"gaussian": "a Gaussian x_T", "ddim-inversion": f"DDIM inversion of {guess}",
             "exact": f"exact inversion of {guess}"}.get(init, init)
    words = [f"--task {task}:"]
    if switch_method:
        words.append("running the DEQ gradient method (--method deq; exact inversion needs the whole "
                     "image; --method baseline for the baseline)")
    words.append(f"from {start}" if switch_method else f"starting from {start}")
    words.append(f"(--init {init}: {WHY_INIT[task]}; --init to choose another)" if choose_init
                 else f"(--init {init})")
    if choose_steps:
        words.append(f"for at most {RESTORATION_STEPS} steps (--max-steps: more steps fit the known pixels "
                     f"and degrade the rest)")
    return " ".join(words)


def folder_words(inv: dict, typed: dict[str, str]) -> list[str]:
    """What the command line chose of the run's kind, as words of its default folder: the task
    with its mask or factor (and fill, where given), then the method and the start where given.
    E.g. --task inpaint --mask random:0.5 -> ['inpaint', 'random0.5']; --init random --method deq
    -> ['deq', 'gaussian']."""
    words = []
    if inv["task"] != "reconstruct" and {"task", *TASK_OPTIONS} & set(typed):
        detail = (Path(inv["mask"]).stem if inv["mask"].lower().endswith(".png") else inv["mask"]) \
            if inv["task"] == "inpaint" else f"x{inv['factor']}"
        words += [inv["task"], detail.replace(":", "")]
        if inv["task"] == "inpaint" and "fill" in typed:
            words.append(inv["fill"])
    words += [inv["method"]] * ("method" in typed) + [canonical_init(inv["init"])] * ("init" in typed)
    return [re.sub(r"[^A-Za-z0-9._-]", "_", w) for w in words]


def default_out(cfg: dict, typed: dict[str, str]) -> Optional[str]:
    """Without --out (or --inversion.out), runs of other kinds get folders of their own, so that
    after the quickstart the other README commands are not refused as "an earlier inversion": the
    config's inversion.out, followed by folder_words (runs/invert-faces, runs/invert-faces-deq,
    runs/invert-faces-inpaint-center, runs/invert-faces-super-resolution-x2). Returns the line
    that names the folder (None where it is the config's, or the user's own)."""
    inv = cfg["inversion"]
    words = folder_words(inv, typed)
    if "out" in typed or not words:
        return None
    out = "-".join([str(inv["out"]).rstrip("/"), *words])
    set_path(cfg, "inversion.out", out)
    return f"run folder: {out} (the config's inversion.out, named after the task, method and start " \
           f"given; --out to choose another)"


def command_defaults(cfg: dict, args: argparse.Namespace, argv: list[str]) -> Optional[str]:
    """parse()'s `adjust`: a restoration's method and start, the refusal of flags that would do
    nothing, and the default run folder; returns the lines to print (None: nothing to say)."""
    notes = [restoration_defaults(cfg, args, argv)]
    typed = typed_inversion_keys(argv, args)
    check_applicable(runs_as(cfg), typed)
    notes.append(default_out(cfg, typed))
    return "\n".join(n for n in notes if n) or None


def optimizes(inv: dict) -> bool:
    return inv["method"] != "exact"


def starts_exact(inv: dict) -> bool:
    return inv["method"] == "exact" or canonical_init(inv["init"]) == "exact"


def runs_as(cfg: dict) -> dict:
    """The inversion section as the run reads it, for check_applicable: time shards solve a
    per-step exact inversion over all timesteps instead (runs/inversion.check_time_shardable;
    under ddp_time, time_shards unset is the whole world, which may be more than 1)."""
    inv = dict(cfg["inversion"])
    exact = dict(inv.get("exact") or {})
    sharded = (cfg.get("trainer") or {}).get("strategy") == "ddp_time" and \
        (cfg.get("parallel") or {}).get("time_shards") != 1
    if sharded and starts_exact(inv):
        exact["mode"] = "all-timesteps"
    return {**inv, "exact": exact}


def exact_mode(inv: dict) -> str:
    from deqlit.deq.inversion import exact_option_defaults
    return (inv.get("exact") or {}).get("mode") or exact_option_defaults()["mode"]


def takes_solver_option(key: str) -> Callable[[dict], bool]:
    """Does the DEQ method's solver (inversion.solver) read solver option `key`?"""
    return lambda inv: inv["method"] == "deq" and key in option_defaults(inv["solver"])


def solver_option_need(key: str) -> str:
    return f"--method deq with --solver {' or '.join(solvers_taking(key))} (an option of its forward solve)"


# Keys of the inversion section that only some runs read, with the runs that do: set on the command
# line for another run they would be ignored, and recorded in metrics.json as if they had been used.
# (The same values from the config file are defaults, not choices: they are never refused.)
GRADIENT_METHODS = ("--method deq or baseline (the exact method takes no optimization step)", optimizes)
DEQ_ONLY = ("--method deq (its forward solve; exact and the baseline run the chain step by step)",
            lambda inv: inv["method"] == "deq")
ONLY_FOR: dict[str, tuple[str, Callable[[dict], bool]]] = {
    **{key: (f"--task {task}", lambda inv, task=task: inv["task"] == task) for key, task in TASK_OPTIONS.items()},
    **{key: GRADIENT_METHODS for key in ("lr", "max_steps", "early_stop_loss")},
    "optimize_noise": ("--method deq or baseline with --eta above 0 (the noise the chain injects; "
                       "at eta 0 it injects none)", lambda inv: optimizes(inv) and inv["eta"] > 0),
    "init": ("--method deq or baseline (the start they refine; the exact method is its own start)",
             lambda inv: optimizes(inv) or canonical_init(inv["init"]) == "exact"),
    **{key: DEQ_ONLY for key in ("solver", "tau", "warm_start")},
    **{key: (solver_option_need(key), takes_solver_option(key))
       for key in {k for name in SOLVERS for k in option_defaults(name)}},
    "grad_checkpointing": ("--method baseline (its backward pass through the chain)",
                           lambda inv: inv["method"] == "baseline"),
    "exact": ("--method exact or --init exact (the exact inverse solve)", starts_exact),
    "exact.init": ("--inversion.exact.mode all-timesteps (the start of its solve over all timesteps; "
                   "per-step starts each step from its DDIM-inversion guess)",
                   lambda inv: exact_mode(inv) == "all-timesteps"),
}


def check_applicable(inv: dict, typed: dict[str, str]) -> None:
    """Refuse the keys the command line set that this run would not read (ONLY_FOR), naming each
    flag and the task or method that reads it."""
    refused = [key for key in typed if key in ONLY_FOR and not ONLY_FOR[key][1](inv)]
    # --inversion.exact.init sets 'exact' and 'exact.init': name it once, for the outer reason.
    refused = [key for key in refused if key.split(".", 1)[0] == key or key.split(".", 1)[0] not in refused]
    if not refused:
        return
    flags_by_need: dict[str, list[str]] = {}
    for key in refused:
        flags_by_need.setdefault(ONLY_FOR[key][0], []).append(typed[key])
    raise unread_flags(flags_by_need, f"in this run (--task {inv['task']}, --method {inv['method']})",
                       "choose the settings that use {them}")


def restoration_summary(metrics: dict) -> str:
    """The restoration's mean scores in words (metrics.json's mean_hole_psnr, ...)."""
    m = metrics
    if m["settings"].get("task") == "inpaint":
        return (f"{m['settings'].get('mask')} mask: mean PSNR on the hidden pixels {m['mean_hole_psnr']:.2f} dB "
                f"(the {m['settings'].get('fill')} fill {m['mean_input_hole_psnr']:.2f} dB, the start's image "
                f"{m['mean_initial_hole_psnr']:.2f} dB), SSIM there {m['mean_hole_ssim']:.3f}; whole image "
                f"PSNR {m['mean_restored_psnr']:.2f} dB, SSIM {m['mean_restored_ssim']:.3f}")
    # The result keeps the low-resolution image exactly (projected); so does the start it is
    # compared with, or the comparison would credit the steps with the projection's gain.
    start = (f"the start {m['mean_initial_restored_psnr']:.2f} dB, kept to the low-resolution image "
             f"as the result is" if m.get("mean_initial_restored_psnr") is not None
             else f"the start's image {m['mean_initial_psnr']:.2f} dB")
    return (f"{m['settings'].get('factor')}x super-resolution: mean PSNR {m['mean_restored_psnr']:.2f} dB "
            f"({start}; bicubic {m['mean_input_psnr']:.2f} dB), SSIM {m['mean_restored_ssim']:.3f}")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def unconverged_images(metrics: dict) -> list[dict]:
    """The per-image metrics of the images whose exact inverse solve missed its tolerance."""
    return [m for m in metrics["images"] if m.get("exact_solve_converged") is False]


def unconverged_warning(metrics: dict, precision: Optional[str] = None) -> Optional[str]:
    """One line naming the images whose exact inversion (method exact, or the start of init
    exact) missed its tolerance, what they reached, and the flags that may help; None if none.
    precision: the one the run computed in (devices.section_precision), for a half precision's remedy."""
    import inspect

    from deqlit.deq.inverse_map import DEFAULT_MAX_ITER, exact_invert
    from deqlit.deq.inversion_report import remedies
    failed = unconverged_images(metrics)
    if not failed:
        return None
    settings, exact = metrics["settings"], metrics["settings"].get("exact") or {}
    defaults = inspect.signature(exact_invert).parameters
    mode = exact.get("mode", defaults["mode"].default)
    solver, tol = exact.get("solver", defaults["solver"].default), exact.get("tol", defaults["tol"].default)
    max_iter = exact.get("max_iter") or DEFAULT_MAX_ITER[mode]
    shown = first_few(m["index"] for m in failed)
    worst = max(m["exact_solve_residual"] for m in failed)
    what = "exact inversion" if settings.get("method") == "exact" else \
        "the exact inversion of the start (--init exact, which the gradient steps then refine)"
    reached = f"relative residual up to {worst:.1e} against tol {tol:g} after {max_iter} iterations " \
              f"{'per step' if mode == 'per-step' else 'in all'}"
    if settings.get("method") == "exact":
        psnr = sorted(m["psnr"] for m in failed)
        reached += f", PSNR {psnr[0]:.1f} dB" + (f" to {psnr[-1]:.1f} dB" if len(psnr) > 1 else "")
        converged = [m["psnr"] for m in metrics["images"] if m.get("exact_solve_converged")]
        if converged:
            reached += f" (the converged images: {sum(converged) / len(converged):.1f} dB on average)"
    T = len(metrics["chain"]["timesteps"])
    return (f"warning: {what} did not converge for {len(failed)} of {plural(len(metrics['images']), 'image')} "
            f"(dataset indices {shown}): {reached}. What helps: {remedies(T, mode, solver, max_iter, precision, tol)}")


def steps_summary(metrics: dict) -> str:
    """How many Adam steps the images took and, for those that took none, why: their start's loss
    was already under their early-stop threshold (early_stop_loss, scaled to what y holds)."""
    images, settings = metrics["images"], metrics["settings"]
    steps = [m["steps"] for m in images]
    spread = f"{min(steps)}" if min(steps) == max(steps) else \
        f"{min(steps)} to {max(steps)}, {sum(steps) / len(steps):.1f} on average"
    text = f"Adam steps per image: {spread} (--max-steps {settings.get('max_steps')})"
    idle = [m for m in images if m["steps"] == 0]
    if idle:
        threshold = sum(m.get("early_stop_threshold", 0.0) for m in idle) / len(idle)
        scaled = "" if abs(threshold - settings.get("early_stop_loss", 0.0)) < 1e-12 else \
            f" x the share of each image the task observes = {threshold:.3g}"
        text += (f"; {len(idle)} of {plural(len(images), 'image')} took none: the start's loss was already "
                 f"under early_stop_loss {settings.get('early_stop_loss'):g}{scaled} "
                 f"(--inversion.early_stop_loss 0 takes every step)")
    return text


def main(argv: Optional[list[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, cfg = parse(build_parser(), argv, FLAGS, adjust=command_defaults)
    if args.note and not launched_worker():
        print(args.note)
    metrics, out = run_inversion(cfg, resume=args.resume, progress=not args.no_progress)
    if not metrics:          # a process other than rank 0 of a multi-process run
        return metrics
    method = metrics["settings"].get("method")
    task = metrics["settings"].get("task", "reconstruct")
    gaussianity = (f"latents: lag-1 autocorrelation {metrics['mean_latent_autocorrelation']:.2f}, "
                   f"kurtosis {metrics['mean_latent_kurtosis']:.2f} (white noise: 0 and 3)")
    warning = unconverged_warning(metrics, section_precision(cfg.get("trainer")))
    if warning:
        print(f"\n{warning}")
    unconverged = len(unconverged_images(metrics))
    head = (f"\n{'restored' if task != 'reconstruct' else 'inverted'} {plural(metrics['num_images'], 'image')} "
            f"with {method} (init {metrics['settings'].get('init')}, "
            f"T = {len(metrics['chain'].get('timesteps', []))})")
    if task == "reconstruct":
        print(f"{head}: mean loss {metrics['mean_exact_loss']:.4g} (exact chain from the saved latents), "
              f"mean PSNR {metrics['mean_psnr']:.2f} dB (start {metrics['mean_initial_psnr']:.2f} dB), "
              f"mean SSIM {metrics['mean_ssim']:.3f}"
              + (f"; {unconverged} of {metrics['num_images']} did not converge (warning above)"
                 if unconverged and method == "exact" else "") + f"; {gaussianity}")
    else:
        print(f"{head}, {restoration_summary(metrics)}; {gaussianity}")
    if method != "exact" and metrics["images"]:
        print(steps_summary(metrics))
    merged = (out / "latents.pt").is_file()
    columns = "target | initial | final | latent x_T" if task == "reconstruct" else \
        "target | degraded input | restored | latent x_T"
    print(f"results in {out}/: metrics.json, latents/part-*.pt"
          + (f", grid.png ({columns}, PSNR under each image), curves.png "
             f"({'the exact solve: residual per state and iteration, PSNR against network evaluations' if method == 'exact' else 'loss against optimization step'}), "
             f"latents.pt (python sample.py --latents {out}/latents.pt)" if merged else ""))
    print(f"view the curves: tensorboard --logdir {out}/tb")
    return metrics
