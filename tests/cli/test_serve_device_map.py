"""``serve --device-map``: a map that does not fit the model is one clear line, status 2."""

from __future__ import annotations

from patchserve.cli import main as cli


def test_a_map_missing_layers_says_which(capsys):
    assert cli.main(["serve", "--device-map", "cpu:0-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: device map 'cpu:0-1': layers 2-")
    assert err.endswith("have no device")


def test_a_map_naming_no_device(capsys):
    assert cli.main(["serve", "--device-map", "tpu9:0-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: device map: 'tpu9' is not a torch device"


def test_device_map_with_replicas_is_refused(capsys):
    assert cli.main(["serve", "--device-map", "auto", "--replicas", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --device-map and --replicas together are not supported yet"
