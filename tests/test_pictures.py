"""deqlit/pictures.py: the sizes of the labelled pictures."""
from __future__ import annotations

import torch


def test_numbered_grid_and_a_title_that_fits():
    """numbered_grid: ceil(sqrt(N)) columns; fit_title widens the canvas to a long title and gives
    each of its lines a line; without it (other pictures) the size is what it was."""
    from deqlit.pictures import labelled_grid, numbered_grid
    images = torch.zeros(5, 1, 32, 32)
    grid = numbered_grid(images, "one\ntwo")
    assert grid.size == (4 + 3 * 100, 2 * 16 + 2 * (96 + 16 + 4) + 4)      # 3 columns, 2 rows
    long = "a title far longer than two tiles of ninety-six pixels side by side"
    plain = labelled_grid([list(images[:2])], title=long)
    fitted = labelled_grid([list(images[:2])], title=long, fit_title=True)
    assert plain.size == (4 + 2 * 100, 16 + 96 + 4 + 4) and fitted.height == plain.height
    assert fitted.width > plain.width
