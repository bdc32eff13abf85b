"""Argument checks the analysis tools share."""


def check_depth(depth, deepest: int | None = None) -> None:
    """depth: layers ahead, a positive integer (at most `deepest`, where given)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1 or (deepest is not None and depth > deepest):
        most = "" if deepest is None else f" of at most {deepest}"
        raise ValueError(f"depth must be a positive integer{most} (layers ahead), got {depth!r}")
