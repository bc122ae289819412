"""The fine-tuning curves: one panel per metric, whole epochs on the x axis."""

from pipeline import plotting


def test_curves_tick_whole_epochs_only(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plotting, "save_figure", lambda fig, path: drawn.append(fig))
    history = [
        {"epoch": e, "train_acc": 0.5, "val_acc": 0.6, "train_loss": 1.0, "val_loss": 0.9}
        for e in (1, 2, 3)
    ]
    plotting.plot_history(history, tmp_path / "curves.png", "lite0")
    (fig,) = drawn
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks and all(t == int(t) for t in ticks), ticks
    plotting.plt.close(fig)


def test_save_figure_writes_the_file_whole(tmp_path):
    fig, ax = plotting.plt.subplots()
    ax.plot([0, 1])
    plotting.save_figure(fig, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]  # no temporary left
    assert fig.number not in plotting.plt.get_fignums()  # closed
