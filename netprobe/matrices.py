"""One stored matrix as a labelled 2-D DataFrame: what `Run.matrix` returns."""

from __future__ import annotations

import numpy as np
import pandas as pd


def pick_capture(df: pd.DataFrame, epoch: int | None, step: int | None) -> pd.DataFrame:
    """The rows of one capture: at `step`; else the last capture of `epoch` (the one after it:
    a start capture shares epoch 0 with the capture after epoch 0); else the last capture."""
    what = "matrices"
    if step is not None:
        chosen, what = df[df["step"] == step], f"step={step}"
    elif epoch is not None:
        of_epoch = df[df["epoch"] == epoch]
        chosen = of_epoch[of_epoch["step"] == of_epoch["step"].max()]
        what = f"epoch={epoch}"
    else:
        chosen = df[df["step"] == df["step"].max()]
    if chosen.empty:
        captures = ", ".join(f"step {s} (epoch {e})" for s, e in _captures(df))
        raise KeyError(f"no {what} capture; stored: {captures or 'none'}")
    return chosen


def _captures(df: pd.DataFrame) -> list[tuple[int, int]]:
    return sorted({(int(s), int(e)) for s, e in zip(df["step"], df["epoch"])})


def labelled(rows: pd.DataFrame, name: str, order: list[str] | None = None) -> pd.DataFrame:
    """The rows of one capture of matrix `name` as one 2-D DataFrame of float64.

    - One value per (row, col) pair (`cka`, `corr_mean`, `edge`): layers × layers, index named
      `row` and columns `col`, in `order` (forward order); NaN where no pair is stored. Pairs
      stored as an upper triangle with its diagonal (symmetric measures, stored once) are
      mirrored.
    - One stored matrix (`C` of one pair): its shape, axes named by its row and col layers.
    - One vector per layer (`sign_map`, `emission`): layers × positions, NaN-padded.
    """
    values = [np.asarray(v, dtype=np.float64) for v in rows["values"]]
    shapes = [tuple(int(n) for n in s) for s in rows["shape"]]
    if all(v.size == 1 for v in values):
        return _pairs(list(rows["row"]), list(rows["col"]), [float(v[0]) for v in values], order)
    if len(values) == 1:
        matrix = values[0].reshape(shapes[0])
        if matrix.ndim > 2:
            raise ValueError(
                f"matrix {name!r} has shape {list(shapes[0])}; read it with run.matrices()"
            )
        frame = pd.DataFrame(matrix.reshape(len(matrix), -1) if matrix.ndim else [[matrix]])
        frame.index.name = rows["row"].iloc[0] or "row"
        frame.columns.name = rows["col"].iloc[0] or "col"
        return frame
    if all(len(s) == 1 for s in shapes):
        frame = pd.DataFrame([pd.Series(v) for v in values], index=list(rows["row"]))
        frame.index.name, frame.columns.name = "row", "index"
        return frame
    pairs = ", ".join(f"row={r!r} col={c!r}" for r, c in zip(rows["row"], rows["col"]))
    raise ValueError(f"{len(values)} {name!r} matrices at this capture; choose one: {pairs}")


def _pairs(
    rows: list[str], cols: list[str], values: list[float], order: list[str] | None
) -> pd.DataFrame:
    rank = {n: i for i, n in enumerate(order or [])}
    names = sorted(dict.fromkeys(rows + cols), key=lambda n: rank.get(n, len(rank)))
    index = {n: i for i, n in enumerate(names)}
    out = np.full((len(names), len(names)), np.nan)
    for r, c, v in zip(rows, cols, values):
        out[index[r], index[c]] = v
    stored = set(zip(rows, cols))
    upper = all(index[r] <= index[c] for r, c in stored)
    if upper and all((n, n) in stored for n in names):
        out = np.where(np.isnan(out), out.T, out)
    frame = pd.DataFrame(out, index=pd.Index(names, name="row"))
    frame.columns = pd.Index(names, name="col")
    return frame
