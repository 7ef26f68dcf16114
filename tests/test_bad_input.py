"""Bad input through the command line: each case ends with a non-zero exit and one line that
names the culprit (option, file, key, field, dtype), before any work starts."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import blip_fast
from blip_fast.cli import main


def _fails(argv, capsys) -> tuple[int, str]:
    """Run the CLI in-process; returns (exit code, what it printed on stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    code = exc.value.code
    err = capsys.readouterr().err
    if isinstance(code, str):  # sys.exit(message): printed by the interpreter, exit status 1
        return 1, code
    return code, err


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "hf"
    blip_fast.save(blip_fast.create_model("retrieval", "blip_tiny"), path, format="hf")
    return path


def _copy(src, dst):
    """A copy of the HF directory ``src`` at ``dst``, to damage."""
    shutil.copytree(src, dst)
    return dst


def _eval(checkpoint, tmp_path, *extra):
    ann = tmp_path / "test.json"
    if not ann.exists():
        ann.write_text(json.dumps([{"image": "a.jpg", "caption": ["a dog"]}]))
    base = ["eval-retrieval", "--checkpoint", str(checkpoint), "--ann-file", str(ann)]
    return base + ["--image-root", str(tmp_path), *extra]


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--k-test", "0", "argument --k-test: 0 must be >= 1"),
        ("--k-test", "-1", "argument --k-test: -1 must be >= 1"),
        ("--k-test", "many", "argument --k-test: 'many' is not an integer"),
        ("--batch-size", "0", "argument --batch-size: 0 must be >= 1"),
        ("--device", "cuda:99", "argument --device: 'cuda:99': this machine has"),
        ("--device", "tpu", "argument --device: 'tpu'"),
    ],
)
def test_bad_option_value_is_named(tiny_hf, tmp_path, capsys, option, value, message):
    code, err = _fails(_eval(tiny_hf, tmp_path, option, value), capsys)
    assert code == 2 and message in err


def test_k_test_from_the_yaml_is_checked(tiny_hf, tmp_path, capsys):
    cfg = tmp_path / "retrieval_flickr.yaml"
    cfg.write_text("k_test: 0\n")
    code, err = _fails(_eval(tiny_hf, tmp_path, "--config", str(cfg)), capsys)
    assert code == 1 and f"{cfg}: k_test: 0: expected an integer >= 1" in err


def test_integer_weights_are_refused_naming_key_and_dtype(tiny_hf, tmp_path, capsys):
    bad = _copy(tiny_hf, tmp_path / "int32")
    sd = load_file(str(bad / "model.safetensors"))
    sd = {k: v.to(torch.int32) if k == "itm_head.weight" else v for k, v in sd.items()}
    save_file(sd, str(bad / "model.safetensors"))
    code, err = _fails(_eval(bad, tmp_path), capsys)
    assert code == 1
    assert "key 'itm_head.weight' has dtype torch.int32; the model holds it as torch.float32" in err


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c["vision_config"].update(hidden_size="768"),
         "vision_config.hidden_size: '768': expected an integer >= 1"),
        (lambda c: c["text_config"].update(num_hidden_layers=0),
         "text_config.num_hidden_layers: 0: expected an integer >= 1"),
        (lambda c: c.update(vision_config=[]), "vision_config must be an object, got list"),
        (lambda c: c["text_config"].update(layer_norm_eps=None),
         "text_config.layer_norm_eps: None: expected a number >= 0"),
    ],
)  # fmt: skip
def test_malformed_hf_config_names_the_field(tiny_hf, tmp_path, capsys, edit, message):
    bad = _copy(tiny_hf, tmp_path / "hf")
    cfg = json.loads((bad / "config.json").read_text())
    edit(cfg)
    (bad / "config.json").write_text(json.dumps(cfg))
    code, err = _fails(_eval(bad, tmp_path), capsys)
    assert code == 1 and f"{bad / 'config.json'}: {message}" in err


def test_config_json_that_is_not_json_names_the_file(tiny_hf, tmp_path, capsys):
    bad = _copy(tiny_hf, tmp_path / "hf")
    (bad / "config.json").write_text("{'vision_config': ")
    code, err = _fails(_eval(bad, tmp_path), capsys)
    assert code == 1 and f"{bad / 'config.json'}: Expecting property name" in err


def test_empty_annotation_file_names_it(tiny_hf, tmp_path, capsys):
    (tmp_path / "test.json").write_text("[]")
    code, err = _fails(_eval(tiny_hf, tmp_path), capsys)
    assert code == 1 and f"annotation file {tmp_path / 'test.json'} has no entries" in err


def test_errors_are_one_line_unless_debug(tiny_hf, tmp_path, capsys, monkeypatch):
    argv = _eval(tmp_path / "missing.pth", tmp_path)
    code, err = _fails(argv, capsys)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"FileNotFoundError: checkpoint not found: {tmp_path / 'missing.pth'}" in err
    with pytest.raises(FileNotFoundError):
        main(["--debug", *argv])
    monkeypatch.setenv("BLIP_FAST_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(argv)


def test_safetensors_path_gets_safetensors_and_its_config(tmp_path):
    model = blip_fast.create_model("retrieval", "blip_tiny")
    path = blip_fast.save(model, tmp_path / "m.safetensors")
    assert path.read_bytes()[:2] != b"PK"  # not a torch zip pickle
    again = blip_fast.load(path)
    assert again.load_report.config_source == "file" and again.cfg == model.cfg
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
