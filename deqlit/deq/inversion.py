"""Inverting one batch of images: find the x_T whose DDIM chain regenerates each image.

Plain PyTorch: the LightningModule (lit/inversion_module.py) runs one BatchInverter per batch of a
streamed dataset, and the benchmarks call it directly.

Methods (paper Algorithms 1 and 2):
- deq: solve X* = h(X*; x_T) without gradient, warm-started from the previous step, then one damped
  step X = (1 - tau) X* + tau h(X*; x_T) with gradient; loss on row 0 (x_0). Memory does not grow
  with T.
- baseline: backpropagate through the sequential T-step chain (optionally with gradient
  checkpointing per step).
- exact: no optimization: the latents of the exact inverse chain (deqlit.diffusion.inverse),
  which the start `init: exact` also uses before the gradient method refines them.

Restoration (deq/degradations.py): with task inpaint or super-resolution the loss compares
A(x_0) with y = A(target) only, and the model completes the rest (deq and baseline). The starts
ddim-inversion and exact invert the guess of the whole image (the known pixels, the hole filled
or y upsampled): exact starts the chain's x_0 at that guess, then the steps fit y.

Every image is optimized on its own: per-image seeds, Adam (elementwise), a per-image early stop,
per-image solver stops (deq/solvers.py) and a per-image warm-start shift. So an image's latent
does not depend on the batch size, on which images share its batch, or on the number of
processes, up to float rounding of batched network calls.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.utils.checkpoint
from torch import nn

from deqlit.deq.blocks import all_rows, x0_objective
from deqlit.deq.degradations import TASK_OPTIONS, check_task, frobenius_loss, make_degradation
from deqlit.deq.layer import DEQSampler
from deqlit.deq.solvers import SolverDivergedError, get_solver, option_defaults
from deqlit.deq.warm_start import shifted_warm_start
from deqlit.diffusion.chain import Chain
from deqlit.diffusion.seeds import per_image_generator
from deqlit.diffusion.sequential import ddim_encode, ddim_sample
from deqlit.guards import NonFiniteError
from deqlit.deq.reduce import LOCAL, LocalReducer

METHODS = ("deq", "baseline", "exact")
INITS = ("gaussian", "ddim-inversion", "exact")
# 'random' was inversion's name for the Gaussian start (the paper's "random initialization") while
# joint fine-tuning called it 'gaussian'; both are accepted, 'gaussian' is what runs record.
INIT_ALIASES = {"random": "gaussian"}


def canonical_init(init: str) -> str:
    """The one name of a start: 'random' -> 'gaussian', other names unchanged."""
    return INIT_ALIASES.get(init, init)


# What an image whose exact inverse solve misses tol does (settings.exact's on_fail): 'warn' keeps
# its latent and the run names it at the end (exact_invert's on_fail 'return'); 'raise' stops.
EXACT_ON_FAIL = ("warn", "raise")
# exact_invert's arguments that the caller passes, not the settings.
_EXACT_CALLER = ("model", "x0", "chain", "noise", "max_batch", "reducer")


def exact_option_defaults(solver: Optional[str] = None) -> dict[str, Any]:
    """The keys settings.exact (a config's inversion.exact) takes with their defaults:
    exact_invert's own arguments (mode, solver, ...; on_fail 'warn') and the options of `solver`
    (None: exact_invert's default solver)."""
    import inspect

    from deqlit.deq.inverse_map import exact_invert
    params = inspect.signature(exact_invert).parameters
    own = {k: p.default for k, p in params.items()
           if k not in _EXACT_CALLER and p.kind is not p.VAR_KEYWORD}
    options = option_defaults(own["solver"] if solver is None else solver)
    return {**own, "on_fail": "warn", **{k: v for k, v in options.items() if k not in own}}


def check_exact_options(exact: dict[str, Any], where: str = "inversion.exact") -> None:
    """Raise ValueError naming the first key of `exact` that the exact inverse solve does not
    take (with the close matches) or the first value it refuses; `where` is its config key."""
    import difflib

    from deqlit.deq.inverse_map import INITS as EXACT_INITS, MODES
    from deqlit.deq.solvers import SOLVERS, solvers_taking
    solver = exact.get("solver", exact_option_defaults()["solver"])
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r} for --{where}.solver; use one of {', '.join(SOLVERS)}")
    accepted = exact_option_defaults(solver)
    for key in exact:
        if key in accepted:
            continue
        owners = solvers_taking(key)
        if owners:       # another solver's option: the chosen one would never read it
            raise ValueError(f"--{where}.{key} is an option of solver {', '.join(owners)}, not of "
                             f"{solver!r} (--{where}.solver): drop it or choose one of those solvers")
        close = difflib.get_close_matches(str(key), list(accepted), n=3)
        hint = f"; did you mean {', '.join(f'--{where}.{c}' for c in close)}?" if close else ""
        raise ValueError(f"unknown key {key!r} in {where} (--{where}.{key}){hint} It takes: "
                         f"{', '.join(accepted)}")
    choices = {"mode": MODES, "init": EXACT_INITS, "on_fail": EXACT_ON_FAIL}
    for key, allowed in choices.items():
        if key in exact and isinstance(exact[key], (str, type(None))) and exact[key] not in allowed:
            raise ValueError(f"--{where}.{key} must be one of {', '.join(allowed)}, got {exact[key]!r}"
                             + (" (warn keeps an image's latent when its solve misses tol and names "
                                "it at the end; raise stops the run)" if key == "on_fail" else ""))
    max_iter, tol = exact.get("max_iter"), exact.get("tol", 0.0)
    if max_iter is not None and (not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1):
        raise ValueError(f"--{where}.max_iter must be an integer >= 1 (or null: the mode's default), "
                         f"got {max_iter!r}")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"--{where}.tol must be a number >= 0, got {tol!r}")


@dataclass
class InversionSettings:
    """Everything that decides an image's latent (a resume must match all of it)."""
    method: str = "deq"
    init: str = "gaussian"          # or its alias "random"; ddim-inversion; exact
    lr: float = 0.005
    max_steps: int = 100
    early_stop_loss: float = 0.0   # of the whole image; a restoration x the share its loss sees
    seed: int = 0
    tau: float = 0.1
    warm_start: bool = True
    solver: str = "anderson"
    solver_options: dict[str, Any] = field(default_factory=dict)
    optimize_noise: bool = False
    grad_checkpointing: bool = False
    exact: dict[str, Any] = field(default_factory=dict)   # options of the exact inverse solve
    task: str = "reconstruct"      # or inpaint / super-resolution: the loss sees A(x_0) only
    mask: str = "center"           # inpaint: center, random:P or a PNG (white = known)
    factor: int = 2                # super-resolution: the average-pooling factor
    fill: str = "mean"             # inpaint: the start's guess of the hole, mean or harmonic

    def __post_init__(self) -> None:
        self.init = canonical_init(self.init)

    def validate(self) -> "InversionSettings":
        """Raise ValueError naming the first bad value and its allowed range."""
        def need(ok: bool, text: str) -> None:
            if not ok:
                raise ValueError(text)
        need(self.method in METHODS, f"unknown inversion method {self.method!r}; use one of {', '.join(METHODS)}")
        need(self.init in INITS, f"unknown init {self.init!r}; use one of {', '.join(INITS)}")
        need(self.method != "exact" or self.init == "exact",
             f"method 'exact' finds the latents without optimization: use init 'exact' with it "
             f"(got init {self.init!r}), or method deq to refine another start")
        need(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
             f"lr must be a positive number, got {self.lr!r}")
        need(isinstance(self.max_steps, int) and self.max_steps >= 1,
             f"max_steps must be an integer >= 1, got {self.max_steps!r}")
        need(math.isfinite(self.early_stop_loss) and self.early_stop_loss >= 0,
             f"early_stop_loss must be >= 0, got {self.early_stop_loss!r}")
        need(0 < self.tau <= 1, f"tau must be in (0, 1], got {self.tau!r}")
        check_task(self.task, self.mask, self.factor, self.fill)
        need(self.task == "reconstruct" or self.method != "exact",
             f"--task {self.task} knows only part of each image, and exact inversion inverts whole "
             f"images: use --method deq (the DEQ gradient method) or --method baseline")
        get_solver(self.solver)
        unknown = set(self.solver_options) - set(option_defaults(self.solver))
        need(not unknown, f"solver {self.solver!r} takes no option(s) {sorted(unknown)}; it accepts "
                          f"{sorted(option_defaults(self.solver))}")
        max_iter, tol = self.solver_options.get("max_iter", 1), self.solver_options.get("tol", 0.0)
        need(isinstance(max_iter, int) and max_iter >= 1, f"max_iter must be an integer >= 1, got {max_iter!r}")
        need(math.isfinite(tol) and tol >= 0, f"tol must be >= 0, got {tol!r}")
        check_exact_options(self.exact)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The settings as run.json and metrics.json record them: without the options of other
        tasks (a reconstruction has no mask), which would read as if they had been used."""
        return {k: v for k, v in asdict(self).items() if TASK_OPTIONS.get(k, self.task) == self.task}


def draw_start(model: nn.Module, chain: Chain, targets: torch.Tensor, indices: list[int],
               settings: InversionSettings, max_batch: Optional[int] = None,
               reducer: LocalReducer = LOCAL
               ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[Any]]:
    """The starting latents x_T (B, C, H, W), for eta > 0 the injected noise (T, B, C, H, W), on
    the targets' device and dtype, and for init 'exact' the exact solve's report."""
    shape = tuple(targets.shape[1:])
    x_T, noise = [], []
    for k in indices:
        gen = per_image_generator(settings.seed, k)
        x_T.append(torch.randn(shape, generator=gen))
        if chain.eta > 0:
            noise.append(torch.randn((chain.T,) + shape, generator=gen))
    x_T_t = torch.stack(x_T).to(targets)
    noise_t = torch.stack(noise, dim=1).to(targets) if chain.eta > 0 else None
    report = None
    with torch.no_grad():
        if settings.init == "ddim-inversion":
            x_T_t = ddim_encode(model, targets, chain)
        elif settings.init == "exact":
            from deqlit.deq.inverse_map import exact_invert
            # on_fail 'warn' (default): an image that misses tol keeps its latent; the report says
            # so (exact_solve_converged = false in metrics.json, and invert.py names the images
            # once the run ends); the gradient method refines it when method is deq. 'raise' stops.
            options = dict(settings.exact)
            on_fail = options.pop("on_fail", "warn")
            x_T_t, _, report = exact_invert(model, targets, chain, noise=noise_t, max_batch=max_batch,
                                            on_fail="return" if on_fail == "warn" else on_fail,
                                            reducer=reducer, **options)
    return x_T_t, noise_t, report


def check_image_size(model: nn.Module, targets: torch.Tensor) -> None:
    """Refuse images the network does not take, naming the config key that fixes it."""
    res, ch = getattr(model, "resolution", None), getattr(model, "in_channels", None)
    if targets.dim() != 4:
        raise ValueError(f"targets must be (N, C, H, W), got shape {tuple(targets.shape)}")
    if res is not None and (targets.shape[-1] != res or targets.shape[-2] != res):
        raise ValueError(f"the images are {targets.shape[-2]}x{targets.shape[-1]} but the model takes "
                         f"{res}x{res}: set data.resolution to {res} (the loader resizes) or use a "
                         f"model trained at {targets.shape[-2]}x{targets.shape[-1]}")
    if ch is not None and targets.shape[1] != ch:
        raise ValueError(f"the images have {targets.shape[1]} channels but the model takes {ch}: "
                         f"set data.channels to {ch}")


def sequential_x0(model: nn.Module, x_T: torch.Tensor, chain: Chain, noise: Optional[torch.Tensor],
                  checkpoint: bool = False) -> torch.Tensor:
    """x_0 of the sequential chain, with autograd through every step when grad is on (the
    baseline's cost); checkpoint=True recomputes each step's activations in the backward pass."""
    def checkpointed(net, x, t):
        return torch.utils.checkpoint.checkpoint(net, x, t, use_reentrant=False)
    return ddim_sample(model, x_T, chain, noise=noise, step=checkpointed if checkpoint else None)


class BatchInverter:
    """Optimizes the latents of one batch: targets (B, C, H, W) in [-1, 1], their dataset indices.

    Call `step()` until `finished`, then `result()`. `state_dict()` / `load_state_dict()` hold
    everything needed to continue exactly (latents, Adam, warm start, history).
    """

    def __init__(self, model: nn.Module, chain: Chain, targets: torch.Tensor, indices: list[int],
                 settings: InversionSettings, max_batch: Optional[int] = None,
                 reducer: LocalReducer = LOCAL):
        check_image_size(model, targets)
        if not bool(torch.isfinite(targets).all()):
            raise ValueError("the images hold NaN/Inf values: check the dataset files")
        self.model, self.chain, self.targets = model, chain, targets
        self.indices, self.settings = [int(i) for i in indices], settings
        # What the loss sees of each image: y = A(x_0) (all of it for plain inversion), and the
        # image a person is shown of y, which also seeds the DDIM-inversion start and warm start.
        self.degradation = make_degradation(settings.task, settings.mask, settings.factor, targets,
                                            self.indices, settings.seed, settings.fill)
        self.observed = self.degradation.apply(targets)
        self.shown = self.degradation.shown(self.observed, targets)
        self.started = time.perf_counter()
        self.seconds_before = 0.0             # time spent before a resume
        B = targets.shape[0]
        # reducer: a time group's (deqlit/parallel): its processes hold the same images and latents
        # and split the T chain rows (each holds its block); LOCAL: the block of all rows.
        self.reducer = reducer
        x_T, noise, self.exact_report = draw_start(model, chain, self.shown, self.indices, settings,
                                                   max_batch, reducer)
        self.start_latents = x_T.detach().clone()
        # Per-batch leaves: Lightning's configure_optimizers holds optimizers of module parameters,
        # which these latents are not (a new set per batch), so the batch owns its Adam.
        self.latents = x_T.detach().clone().requires_grad_(True)
        self.noise = noise
        params = [self.latents]
        if noise is not None and settings.optimize_noise:
            self.noise = noise.detach().clone().requires_grad_(True)
            params.append(self.noise)
        self.optimizer = torch.optim.Adam(params, lr=settings.lr)
        if reducer.shards > 1 and settings.method == "baseline":
            raise ValueError("the baseline backpropagates through the sequential chain, which time "
                             "shards cannot split: use --parallel.time_shards 1 (or --method deq)")
        self.deq = DEQSampler(model, chain, settings.solver, settings.solver_options, grad="onestep",
                              tau=settings.tau, max_batch=max_batch, reducer=reducer)
        self.block = self.deq.block                       # the rows of X this process holds
        device = targets.device
        self.step_index = 0
        self.loss_history = torch.full((B, settings.max_steps), math.nan, device=device)
        self.iterations_history = torch.zeros((B, settings.max_steps), device=device)
        self.best_loss = torch.full((B,), math.inf, device=device)
        self.best_latents = x_T.detach().clone()
        self.best_noise = None if noise is None else noise.detach().clone()
        self.last_loss = torch.full((B,), math.inf, device=device)
        self.active = torch.ones(B, dtype=torch.bool, device=device)
        # early_stop_loss is a loss of the whole image; a restoration's loss sums over what y holds
        # (a quarter of the values for 2x super-resolution), so the same fit per value stops it
        # below this fraction of the threshold. Unscaled, the pooled loss of the exact start
        # (~0.12 on the faces) was under 0.5 from the start and every image stopped at once.
        self.stop_below = settings.early_stop_loss * self.degradation.observed_fraction(targets)
        self.image_steps = torch.zeros(B, dtype=torch.long, device=device)   # Adam updates per image
        self.warm: Optional[torch.Tensor] = None       # last solution X (T or block rows, B, C, H, W)
        self.warm_x_T: Optional[torch.Tensor] = None   # the x_T it was solved for
        self.data_var = self.shown.flatten(1).var(1)   # (B,) s^2 of each image's warm-start model
        self.all_stopped = settings.method == "exact"

    # ---- the forward models ---------------------------------------------------------------
    def predict_states(self, x_T: torch.Tensor, noise: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """This block's chain states (rows, B, ...) with a graph back to x_T (and noise), row 0 = x_0
        on the block that holds it; returns (states, solver iterations per image (B,)).
        The baseline's "states" are x_0 alone (one process: the block of all rows holds it)."""
        if self.settings.method == "baseline":
            x0 = sequential_x0(self.model, x_T, self.chain, noise, self.settings.grad_checkpointing)
            return x0[None], torch.full((x_T.shape[0],), float(self.chain.T), device=x_T.device)
        # Warm start: the previous solution moved along the Gaussian-data flow map to the new x_T
        # (deq/warm_start.py). Reused unmoved it starts as far off in residual as a cold start.
        init = None
        if self.settings.warm_start and self.warm is not None:
            init = shifted_warm_start(self.warm, self.warm_x_T, x_T.detach(), self.chain.abar,
                                      self.data_var, self.block)
        X, stats = self.deq(x_T, noise, init=init)
        self.warm, self.warm_x_T = X.detach(), x_T.detach().clone()
        return X, torch.tensor(stats.image_iterations, dtype=torch.float32, device=x_T.device)

    @torch.no_grad()
    def exact_x0(self, x_T: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
        """x_0 of the exact sequential chain (the oracle; what sample.py regenerates)."""
        return sequential_x0(self.model, x_T, self.chain, noise)

    # ---- one optimization step ------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.all_stopped or self.step_index >= self.settings.max_steps

    # White-noise latents stay within about 5; far beyond this the optimizer, not the network, failed.
    SANE_LATENT = 1e3

    def diverged(self, err: Exception) -> Exception:
        """The error for a solve that met NaN/Inf: when Adam has thrown the latents out of range
        (a learning rate far too high), say so and name --lr, instead of the solver's guess that
        the network's weights are bad. A check made only once the solve has failed: no host sync
        in the steps that run."""
        latents = [self.latents] + ([self.noise] if self.noise is not None else [])
        size = max(float(z.detach().abs().nan_to_num(math.inf).max()) for z in latents)
        if size <= self.SANE_LATENT:
            return err
        return NonFiniteError(
            f"the inversion diverged at step {self.step_index}: the Adam steps moved the latents to "
            f"|x_T| = {size:.3g} (white noise stays below about 5), where the noise network returns "
            f"NaN/Inf; lower the learning rate (--lr, now {self.settings.lr:g})")

    def step(self) -> torch.Tensor:
        """One Adam step on every image still above its early-stop threshold (stop_below); returns
        the loss (B,) of the latents before the update. An image under it is left as it is: one
        under it at the start takes no step."""
        k = self.step_index
        x_T, noise = self.latents, self.noise
        with torch.enable_grad():
            try:
                X, iterations = self.predict_states(x_T, noise)
            except SolverDivergedError as err:
                raise self.diverged(err) from None
            losses: dict[str, torch.Tensor] = {}

            def loss_of_x0(x0_hat: torch.Tensor) -> torch.Tensor:
                losses["per_image"] = self.degradation.loss(x0_hat, self.observed)
                # Early stopping decides on the loss before this step.
                losses["active"] = losses["per_image"].detach() >= self.stop_below
                return (losses["per_image"] * losses["active"]).sum()
            objective = x0_objective(X, self.block, loss_of_x0)
            # The block that holds x_0 tells the others the loss (one process: the loss itself).
            held = losses["per_image"].detach() if "per_image" in losses else X.new_zeros(X.shape[1])
            loss = self.reducer.broadcast_from(held, 0)
            self.active = loss >= self.stop_below
            self.optimizer.zero_grad(set_to_none=True)
            objective.backward()
            # Each shard's gradient of the replicated latents is partial: sum them.
            self.reducer.sum_gradients(self.optimizer.param_groups[0]["params"])
        # The loss belongs to the latents before this update: record them, then step.
        self.loss_history[:, k] = loss
        self.iterations_history[:, k] = iterations
        better = loss < self.best_loss
        self.best_loss = torch.where(better, loss, self.best_loss)
        view = better.reshape(-1, *([1] * (x_T.dim() - 1)))
        self.best_latents = torch.where(view, x_T.detach(), self.best_latents)
        if self.best_noise is not None:
            self.best_noise = torch.where(view[None], noise.detach(), self.best_noise)
        before = [p.detach().clone() for p in self.optimizer.param_groups[0]["params"]]
        self.optimizer.step()
        with torch.no_grad():  # Adam's momentum would still move the images that stopped
            self.latents.copy_(torch.where(self.active.reshape(view.shape), self.latents, before[0]))
            if len(before) > 1:
                self.noise.copy_(torch.where(self.active.reshape(view.shape)[None], self.noise, before[1]))
        self.last_loss = loss
        self.step_index += 1
        self.image_steps += self.active.long()
        # One flag a step from the device: has every image reached its threshold (then this step
        # moved none of them)?
        self.all_stopped = not bool(self.active.any())
        return loss

    # ---- results --------------------------------------------------------------------------
    @torch.no_grad()
    def result(self) -> dict[str, Any]:
        """CPU tensors per image: latents, noise, reconstructions (exact chain) at the start and of
        the best latents, losses, and the seconds spent on the batch (shared by its images)."""
        if self.settings.method == "exact":
            self.best_latents = self.start_latents
            self.best_noise = self.noise.detach().clone() if self.noise is not None else None
        recon = self.exact_x0(self.best_latents, self.best_noise)
        initial = self.exact_x0(self.start_latents, None if self.noise is None else self.noise.detach())
        exact_loss = self.degradation.loss(recon, self.observed)
        if self.settings.method == "exact":
            self.best_loss = exact_loss
        seconds = self.seconds_before + time.perf_counter() - self.started
        return {
            "indices": torch.tensor(self.indices, dtype=torch.long),
            "x_T": self.best_latents.float().cpu(),
            "noise": None if self.best_noise is None else self.best_noise.float().cpu(),
            "targets": self.targets.float().cpu(),
            "task": self.settings.task,
            "observed_shown": self.shown.float().cpu(),          # the degraded input, image-sized
            "unknown": None if self.degradation.unknown(self.targets) is None
            else self.degradation.unknown(self.targets).cpu(),   # (B, 1, H, W) bool, inpainting
            "initial": initial.float().cpu(),
            "reconstructions": recon.float().cpu(),
            # The nearest image to it that honours y (the known pixels pasted; for SR the
            # residual of the low-pass image added back); reconstructions itself for plain inversion.
            "restored": self.degradation.project(recon, self.observed).float().cpu(),
            # The start's image made to honour y: what the restoration is worth without any step.
            "initial_restored": self.degradation.project(initial, self.observed).float().cpu(),
            "min_loss": self.best_loss.cpu(),
            "final_loss": self.last_loss.cpu(),
            "initial_loss": self.degradation.loss(initial, self.observed).cpu(),
            "exact_loss": exact_loss.cpu(),
            "loss_history": self.loss_history[:, :max(self.step_index, 1)].cpu(),
            "iterations": self.iterations_history[:, :max(self.step_index, 1)].cpu(),
            "steps": self.step_index,
            "image_steps": self.image_steps.cpu(),               # (B,) the Adam steps each image took
            # (B,) each image's early-stop threshold (the exact method takes no step)
            "stop_below": None if self.settings.method == "exact" else self.stop_below.cpu(),
            "seconds": seconds,
            "exact_report": None if self.exact_report is None else self.exact_report.to_dict(),
        }

    # ---- resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A collective across time shards (every shard calls it): joins the warm start's T rows."""
        def cpu(t):
            return None if t is None else t.detach().cpu().clone()
        warm = None if self.warm is None else all_rows(self.warm, self.chain.T, self.reducer)
        return {"indices": list(self.indices), "step": self.step_index, "latents": cpu(self.latents),
                "noise": cpu(self.noise), "start_latents": cpu(self.start_latents),
                "loss_history": cpu(self.loss_history), "iterations": cpu(self.iterations_history),
                "best_loss": cpu(self.best_loss), "best_latents": cpu(self.best_latents),
                "best_noise": cpu(self.best_noise), "last_loss": cpu(self.last_loss),
                "active": cpu(self.active), "warm": cpu(warm), "warm_x_T": cpu(self.warm_x_T),
                "optimizer": self.optimizer.state_dict(), "all_stopped": self.all_stopped,
                "image_steps": cpu(self.image_steps),
                "seconds": self.seconds_before + time.perf_counter() - self.started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if [int(i) for i in state["indices"]] != self.indices:
            raise ValueError("the saved batch state belongs to other images")
        device = self.targets.device

        def dev(t):
            return None if t is None else t.to(device)
        with torch.no_grad():
            self.latents.copy_(state["latents"].to(self.latents))
            if self.noise is not None and state["noise"] is not None:
                self.noise.copy_(state["noise"].to(self.noise))
        self.step_index = int(state["step"])
        self.start_latents = dev(state["start_latents"])
        self.loss_history, self.iterations_history = dev(state["loss_history"]), dev(state["iterations"])
        self.best_loss, self.best_latents = dev(state["best_loss"]), dev(state["best_latents"])
        self.best_noise, self.last_loss = dev(state["best_noise"]), dev(state["last_loss"])
        self.active, self.warm, self.warm_x_T = dev(state["active"]), dev(state["warm"]), dev(state["warm_x_T"])
        if self.warm is not None:                 # saved with all T rows: keep this block's
            self.warm = self.deq.own_rows(self.warm).clone()
        self.optimizer.load_state_dict(state["optimizer"])   # moves Adam's moments to the params' device
        self.all_stopped = bool(state["all_stopped"])
        # A state saved before per-image counts: every image took every step.
        saved_steps = state.get("image_steps")
        self.image_steps = dev(saved_steps) if saved_steps is not None else \
            torch.full_like(self.image_steps, self.step_index)
        self.seconds_before, self.started = float(state["seconds"]), time.perf_counter()
