"""Training-curve and gradient figures render from small stored runs."""

from netprobe.plots import FIGURES, plot

BASIC = ["training_curves", "grad_flow_bars", "grad_norms", "grad_heatmap"]


def test_every_basic_figure_is_written(tiny_run, tmp_path):
    run = tiny_run("model=cnn")
    out = tmp_path / "figs"
    written = plot([run.path], out=out, formats=["png", "svg"], only=BASIC)
    names = {p.name for p in written}
    for name in BASIC:
        assert name in FIGURES
        assert f"{name}.png" in names and f"{name}.svg" in names
    for path in written:
        assert path.stat().st_size > 5000, path
    index = (out / "index.html").read_text()
    for name in BASIC:
        assert f"{name}.png" in index


def test_groups_differing_in_one_key_get_their_own_folders(tiny_run, tmp_path):
    runs = [tiny_run("init=xavier_normal", f"seed={s}") for s in (0, 1)]
    runs += [tiny_run("init=orthogonal", "seed=0")]
    out = tmp_path / "figs"
    plot([r.path for r in runs], out=out, only=["training_curves"])
    assert (out / "init=orthogonal" / "training_curves.png").exists()
    assert (out / "init=xavier_normal" / "training_curves.png").exists()
