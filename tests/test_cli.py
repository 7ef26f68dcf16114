import json
import subprocess
import sys


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "blip_fast.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_info_lists_backends():
    r = _run("info")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert "reference" in info["backends"]["attention"]["cpu"]
    assert info["torch"].startswith("2.")


def test_convert_official_to_hf_and_back(tmp_path):
    import torch

    import blip_fast

    torch.manual_seed(0)
    model = blip_fast.create_model("retrieval", "blip_tiny")
    blip_fast.save(model, tmp_path / "m.pth", format="official")
    assert (
        _run("convert", str(tmp_path / "m.pth"), str(tmp_path / "hf"), "--format", "hf").returncode
        == 0
    )
    r = _run("convert", str(tmp_path / "hf"), str(tmp_path / "back.pth"), "--format", "official")
    assert r.returncode == 0, r.stderr
    a = torch.load(tmp_path / "m.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
