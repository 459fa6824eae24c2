"""What a restoration knows of an image, y = A(x_0), and the loss that compares a chain's x_0 with it.

Inversion finds the x_T with DEQ(x_T)_0 = x_0 (the paper's loss ||DEQ(x_T)_0 - x_0||_F^2). When only
y = A(x_0) is known, the same DEQ gradient method (Algorithm 2) minimizes
    L(x_T) = ||A(DEQ(x_T)_0) - y||_F^2                                  (per image)
and the model completes what A hides: the latent must regenerate the known part, and the rest is
whatever the chain from that latent makes of it. Exact inversion cannot do this (it inverts the
whole image); the baseline (Algorithm 1) can, through the sequential chain.

Two degradations, both linear:
- inpainting: A(x) = M * x with a mask M of known pixels (1 known, 0 unknown) per image:
  'center' (a centred square of about 25% of the pixels unknown), 'random:P' (each pixel unknown
  with probability P, from the image's own generator, so a mask does not depend on the batch),
  or a PNG file (white = known; a file of another size but the same aspect ratio is resized with
  nearest neighbours, another aspect ratio is refused);
- super-resolution: A(x) = f x f average pooling (the box filter a sensor integrates), factor f.

The start. From a Gaussian x_T the chain's x_0 is some face, far from the image, and the few steps a
T = 10 budget allows leave it there. Better: DDIM-invert a guess of the whole image (init
ddim-inversion), the known pixels with the unknown ones filled ('fill'): 'mean', the mean of the
known pixels, or 'harmonic', the membrane (Laplace) interpolation of the known border, which
solves  Laplacian(x) = 0 on the unknown pixels with x = y on the known ones  (Jacobi iterations,
x <- the mean of its 4 neighbours), the smoothest guess there is. Super-resolution's guess is the
bicubic upsampling of y.

The result. The chain's x_0 only approximately honours y; its orthogonal projection onto
{x : A(x) = y}, x + A^+(y - A(x)), is never farther from the image (which is in that set):
inpainting pastes the known pixels; for average pooling A^+ r is r upsampled with nearest
neighbours (A A^T = I / f^2, so A^+ = f^2 A^T).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from deqlit.diffusion.seeds import per_image_generator

TASKS = ("reconstruct", "inpaint", "super-resolution")
FILLS = ("mean", "harmonic")
# The settings only one task reads: a run of another task neither takes them from the command line
# nor records them (InversionSettings.to_dict).
TASK_OPTIONS = {"mask": "inpaint", "fill": "inpaint", "factor": "super-resolution"}


def frobenius_loss(x0_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The paper's loss: squared Frobenius norm per image in [-1, 1] scale, (B, ...) -> (B,)."""
    return (x0_hat - x0).pow(2).flatten(1).sum(1)


@dataclass
class Degradation:
    """A(x) for one batch: `mask` (B, 1, H, W) of known pixels (inpainting) or `factor` (> 1:
    average pooling, super-resolution); neither: the identity (plain inversion)."""
    mask: Optional[torch.Tensor] = None
    factor: int = 1
    fill: str = "mean"             # inpainting's guess of the unknown pixels: mean or harmonic

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """y = A(x): (B, C, H, W) -> (B, C, H, W) (inpainting) or (B, C, H / f, W / f)."""
        if self.mask is not None:
            return x * self.mask.to(x)
        if self.factor > 1:
            return F.avg_pool2d(x, self.factor)
        return x

    def loss(self, x0_hat: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """||A(x0_hat) - y||_F^2 per image, (B,)."""
        return frobenius_loss(self.apply(x0_hat), observed)

    def shown(self, observed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """What a person is shown of y at the images' size (B, C, H, W): the known pixels with the
        unknown ones filled (inpainting; `fill`: the mean of the known pixels, or their harmonic
        interpolation), or y upsampled bicubically (SR). It is also the start of a DDIM-inversion init."""
        if self.mask is not None:
            mask = self.mask.to(like)
            known = mask.expand_as(like).flatten(1).sum(1).clamp(min=1)
            mean = (observed.flatten(1).sum(1) / known).reshape(-1, 1, 1, 1)
            flat = observed + (1 - mask) * mean
            return harmonic_fill(flat, mask) if self.fill == "harmonic" else flat
        if self.factor > 1:
            up = F.interpolate(observed, size=like.shape[-2:], mode="bicubic", align_corners=False)
            return up.clamp(-1, 1)
        return observed

    def project(self, x0: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """x0 + A^+(y - A(x0)) (B, C, H, W): the nearest image that honours y (the identity for
        plain inversion)."""
        if self.mask is not None:
            mask = self.mask.to(x0)
            return mask * observed + (1 - mask) * x0
        if self.factor > 1:
            return x0 + F.interpolate(observed - self.apply(x0), scale_factor=self.factor, mode="nearest")
        return x0

    def observed_fraction(self, like: torch.Tensor) -> torch.Tensor:
        """(B,) the share of an image's values that y holds: its known pixels' (inpainting),
        1 / f^2 (f x f pooling), 1 (plain inversion). The loss sums over y's values, so at the same
        error per value it is this fraction of the whole image's loss."""
        if self.mask is not None:
            return self.mask.to(like).flatten(1).mean(1)
        return torch.full((like.shape[0],), 1.0 / self.factor ** 2, dtype=like.dtype, device=like.device)

    def unknown(self, like: torch.Tensor) -> Optional[torch.Tensor]:
        """The pixels A hides, (B, 1, H, W) bool (inpainting); None where every pixel is blurred
        alike (super-resolution: the metrics there are on the whole image)."""
        return None if self.mask is None else self.mask.to(like.device) < 0.5


@torch.no_grad()
def harmonic_fill(x: torch.Tensor, mask: torch.Tensor, tol: float = 1e-5, max_iter: int = 5000) -> torch.Tensor:
    """x (B, C, H, W) with its unknown pixels (mask (B, 1, H, W) == 0) replaced by the solution of
    Laplace's equation with the known pixels as boundary (edges: replicate), by Jacobi iterations
    from x until no pixel moves by more than tol."""
    known = mask.expand_as(x) > 0.5
    stencil = torch.tensor([[0.0, 0.25, 0.0], [0.25, 0.0, 0.25], [0.0, 0.25, 0.0]], dtype=x.dtype,
                           device=x.device).view(1, 1, 3, 3).repeat(x.shape[1], 1, 1, 1)
    for _ in range(max_iter):
        neighbours = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), stencil, groups=x.shape[1])
        new = torch.where(known, x, neighbours)
        moved = float((new - x).abs().max())
        x = new
        if moved < tol:
            break
    return x


def center_mask(height: int, width: int, fraction: float = 0.25) -> torch.Tensor:
    """(1, 1, H, W): 1 outside a centred square holding about `fraction` of the pixels."""
    side_h = max(1, round(height * math.sqrt(fraction)))
    side_w = max(1, round(width * math.sqrt(fraction)))
    top, left = (height - side_h) // 2, (width - side_w) // 2
    mask = torch.ones(1, 1, height, width)
    mask[..., top:top + side_h, left:left + side_w] = 0
    return mask


def random_mask(height: int, width: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """(1, 1, H, W): each pixel unknown (0) with probability `fraction`."""
    return (torch.rand(1, 1, height, width, generator=generator) >= fraction).float()


def random_masks(height: int, width: int, fraction: float, indices: Sequence[int], seed: int) -> torch.Tensor:
    """(N, 1, H, W): random_mask of each image, from its own stream (index + a fixed offset, not the
    latent's), so a mask does not depend on the batch."""
    return torch.cat([random_mask(height, width, fraction, per_image_generator(seed, int(i) + 7_777_777))
                      for i in indices])


def check_random_masks(mask: str, height: int, width: int, indices: Sequence[int], seed: int) -> None:
    """--mask random:P over the images `indices`: raise ValueError naming those whose mask hides no
    pixel (nothing to restore: the scores on their hole would be NaN) or every pixel (nothing to
    restore them from), as a mask file that does either is refused (fit_mask)."""
    if not len(indices):
        return
    fraction, pixels = float(mask.split(":", 1)[1]), height * width
    masks = random_masks(height, width, fraction, indices, seed)
    hidden = [(int(i), int((m == 0).sum())) for i, m in zip(indices, masks)]
    for count, words, why, fix in ((0, "no pixel", "nothing to restore", "larger"),
                                   (pixels, "every pixel", "nothing to restore them from", "smaller")):
        bad = [i for i, h in hidden if h == count]
        if bad:
            from deqlit.guards import first_few
            shown = first_few(bad, 8)
            raise ValueError(f"--mask {mask} hides {words} of {len(bad)} of the {len(hidden)} images "
                             f"(dataset indices {shown}; {fraction * pixels:.1f} of {pixels} pixels hidden "
                             f"on average): {why}; use a {fix} fraction")


def read_mask_file(path: str | Path) -> torch.Tensor:
    """(1, 1, h, w) at the file's own size from a PNG: white (>= 128) = known (1), else 0. A file
    with transparency is read as shown over black: a pixel erased to transparent is unknown (read
    without its alpha, it was the white under it, and a hole erased out of a white mask was known)."""
    from PIL import Image
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file {path} does not exist: pass --mask center, "
                                f"--mask random:0.5 or the path of a PNG (white = known pixels)")
    try:
        with Image.open(path) as img:
            if "A" in img.getbands() or "transparency" in img.info:
                img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img.convert("RGBA"))
            grey = img.convert("L")
            values = torch.tensor(list(grey.getdata()), dtype=torch.float32)
            values = values.reshape(1, 1, grey.height, grey.width)
    except OSError as err:
        raise ValueError(f"mask file {path} is not a readable image ({err}): save it as a PNG, "
                         f"white = known pixels") from err
    return (values >= 128).float()


def fit_mask(mask: torch.Tensor, height: int, width: int, path: str | Path) -> torch.Tensor:
    """A file's mask (1, 1, h, w) at the images' size (1, 1, H, W).

    Another size of the same aspect ratio is resized with nearest neighbours; another aspect ratio
    would stretch the mask over other pixels than the ones painted, so it is refused. A mask must
    leave something to restore (a black pixel) and something to restore it from (a white one).
    """
    h, w = mask.shape[-2:]
    if h * width != w * height:
        raise ValueError(f"mask file {path} is {w}x{h} pixels but the images are {width}x{height} "
                         f"(data.resolution): another aspect ratio would stretch the mask; save it at "
                         f"{width}x{height}, or at any size of the same shape")
    fitted = F.interpolate(mask, size=(height, width), mode="nearest") if (h, w) != (height, width) else mask
    resized = f" (resized from {w}x{h} to the images' {width}x{height})" if (h, w) != (height, width) else ""
    if fitted.min() == 1:
        raise ValueError(f"mask file {path} marks every pixel as known (white){resized}: paint the "
                         f"pixels to restore black")
    if fitted.max() == 0:
        raise ValueError(f"mask file {path} marks no pixel as known (all black){resized}, which leaves "
                         f"nothing to restore from: paint the known pixels white")
    return fitted


def mask_digest(mask: torch.Tensor) -> str:
    """'sha256:...' of a mask's known/unknown pixels and its size (not of the file's bytes: a file
    saved again with the same pixels is the same mask)."""
    import hashlib
    known = (mask >= 0.5).to(torch.uint8).contiguous()
    data = repr(tuple(known.shape)).encode() + known.numpy().tobytes()
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


def file_mask(path: str | Path, height: int, width: int) -> torch.Tensor:
    """(1, 1, H, W) from a PNG: white (>= 128) = known; checked and fitted by fit_mask."""
    return fit_mask(read_mask_file(path), height, width, path)


def check_task(task: str, mask: str, factor: int, fill: str = "mean") -> None:
    """Raise ValueError naming a bad task, mask, factor or fill and what is accepted."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r} (the start's guess of the unknown pixels); use one of "
                         f"{', '.join(FILLS)}")
    if task == "inpaint":
        if mask.startswith("random:"):
            try:
                p = float(mask.split(":", 1)[1])
            except ValueError:
                p = math.nan
            if not 0 < p < 1:
                raise ValueError(f"--mask {mask}: the fraction of unknown pixels must be in (0, 1), "
                                 f"e.g. --mask random:0.5")
        elif mask != "center" and not mask.lower().endswith(".png"):
            raise ValueError(f"unknown mask {mask!r}: use center, random:P (0 < P < 1) or a PNG file")
    if task == "super-resolution" and (not isinstance(factor, int) or factor < 2):
        raise ValueError(f"super-resolution needs an integer --factor >= 2, got {factor!r}")


def check_factor_divides(factor: int, height: int, width: int) -> None:
    """Super-resolution pools factor x factor blocks: raise ValueError, naming factors that fit,
    unless the factor divides both sides of the images."""
    if height % factor or width % factor:
        fits = [f for f in range(2, min(height, width) + 1) if height % f == 0 and width % f == 0][:4]
        raise ValueError(f"--factor {factor} does not divide the {height}x{width} images (data.resolution): "
                         f"use a factor that divides both, e.g. --factor {' or '.join(map(str, fits))}")


def make_degradation(task: str, mask: str, factor: int, images: torch.Tensor, indices: Sequence[int],
                     seed: int, fill: str = "mean") -> Degradation:
    """The degradation of a batch of images (B, C, H, W) with dataset indices `indices`."""
    check_task(task, mask, factor, fill)
    height, width = images.shape[-2:]
    if task == "inpaint":
        if mask == "center":
            masks = center_mask(height, width).expand(len(indices), 1, height, width)
        elif mask.startswith("random:"):
            masks = random_masks(height, width, float(mask.split(":", 1)[1]), indices, seed)
        else:
            masks = file_mask(mask, height, width).expand(len(indices), 1, height, width)
        return Degradation(mask=masks.to(images.device, images.dtype).contiguous(), fill=fill)
    if task == "super-resolution":
        check_factor_divides(factor, height, width)
        return Degradation(factor=factor)
    return Degradation()
