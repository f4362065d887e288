import pytest


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    """Progress bars off whatever the terminal (`pytest -s` in one would draw them, and the training
    loop would show a bar instead of its log lines); tests of the display turn them on themselves."""
    monkeypatch.setenv("GMTIER_PROGRESS", "0")
