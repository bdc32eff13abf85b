"""Argument checks the analysis tools share."""


def check_depth(depth, deepest: int | None = None) -> None:
    """depth: layers ahead, a positive integer (at most `deepest`, where given)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1 or (deepest is not None and depth > deepest):
        most = "" if deepest is None else f" of at most {deepest}"
        raise ValueError(f"depth must be a positive integer{most} (layers ahead), got {depth!r}")


def steps_left_out(steps, name: str) -> frozenset:
    """The steps a figure leaves out: the first n (an int), or these step indices."""
    if isinstance(steps, int) and not isinstance(steps, bool):
        if steps < 0:
            raise ValueError(f"{name} must be a non-negative integer or a collection of step indices, got {steps!r}")
        return frozenset(range(steps))
    try:
        indices = frozenset(steps)
    except TypeError:
        indices = None
    if indices is None or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        raise ValueError(f"{name} must be a non-negative integer or a collection of step indices, got {steps!r}")
    return indices
