"""``serve --replicas`` without Ray installed: one line saying what to install, status 2."""

from __future__ import annotations

from patchserve.cli import main as cli


def test_replicas_without_ray_say_what_to_install(monkeypatch, capsys):
    real = cli._has
    monkeypatch.setattr(cli, "_has", lambda module: module != "ray" and real(module))
    assert cli.main(["serve", "--replicas", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --replicas needs Ray: pip install 'patchserve[ray]'"
