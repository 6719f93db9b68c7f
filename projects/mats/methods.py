"""The one registry of MaTS merges; every entry is `fn(base, models, *, stats=None, **hparams) -> StateDict`."""

from projects.mats.conjugate_gradient import conjugate_gradient
from projects.mats.merging import average, diagonal_fisher, regmean, task_arithmetic, ties

METHODS = {
    "average": average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "diagonal_fisher": diagonal_fisher,
    "regmean": regmean,
    "conjugate_gradient": conjugate_gradient,
}
