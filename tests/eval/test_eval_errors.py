"""sdpo-eval is never silent: bad scores, flags, images and weights are one-line errors (exit 2)
or are skipped and reported; --conventions reference; whole-file weight hashes; CLIP loaded once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import save_clip_folder

from sdpo.eval import compare, preprocess, scorers
from sdpo.eval.cli import main as eval_main
from sdpo.eval.errors import RunFailure
from sdpo.eval.generate import GenerateSettings, generate
from sdpo.eval.score import score_manifest
from sdpo.fingerprint import file_hash


@pytest.fixture(autouse=True)
def _quiet(quiet_transformers):
    """Every test here reads stderr: transformers' warnings stay out of it."""


def _write_manifest(path, rows):
    entries = [
        {"prompt": prompt, "gen_image_path": "", "scores": scores} for prompt, scores in rows
    ]
    path.write_text(json.dumps(entries))
    return path


def _cli(capsys, arguments: list[str]) -> tuple[int, str]:
    """Exit code and stderr of one sdpo-eval call, less diffusers' loading progress bars."""
    capsys.readouterr()
    code = eval_main(arguments)
    lines = [
        line
        for line in capsys.readouterr().err.splitlines()
        if line.strip() and "it/s]" not in line
    ]
    return code, "\n".join(lines)


def _one_line_error(capsys, arguments: list[str], status: int = 2) -> str:
    """The one error line of a refused call (status 2), or of a failure while it ran (1)."""
    code, err = _cli(capsys, arguments)
    assert code == status and len(err.splitlines()) == 1, err
    assert err.startswith("sdpo-eval: error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("bad", [float("nan"), True, [1.0], "0.5", float("inf")])
def test_compare_rejects_non_numeric_scores(tmp_path, capsys, bad):
    a = _write_manifest(tmp_path / "a.json", [("p", {"pickscore": 1.0}), ("q", {"pickscore": 2.0})])
    # json.dumps writes NaN / Infinity, which json.loads reads back as floats.
    b = _write_manifest(tmp_path / "b.json", [("p", {"pickscore": 0.5}), ("q", {"pickscore": bad})])
    with pytest.raises(ValueError, match=r"prompt 'q', metric pickscore: score .* finite number"):
        compare.compare(a, b, resamples=10)
    assert "prompt 'q', metric pickscore" in _one_line_error(
        capsys, ["compare", str(a), str(b), "--output", str(tmp_path / "r.json")]
    )
    assert not (tmp_path / "r.json").exists()  # nothing half-written with NaN in it


def test_compare_rejects_bad_scores_resamples_and_output(tmp_path, capsys):
    a = _write_manifest(tmp_path / "a.json", [("p", {"clip": 1.0})])
    b = _write_manifest(tmp_path / "b.json", [("p", [0.5])])
    with pytest.raises(ValueError, match=r"prompt 'p': \"scores\" must be an object"):
        compare.compare(a, b, resamples=10)
    b = _write_manifest(tmp_path / "b.json", [("p", {"clip": 0.5})])
    for resamples in ("0", "-3"):
        command = ["compare", str(a), str(b), "--output", str(tmp_path / "r.json")]
        assert "--resamples: expected an integer >= 1" in _one_line_error(
            capsys, [*command, "--resamples", resamples]
        )
    (tmp_path / "folder").mkdir()
    assert "is a folder" in _one_line_error(
        capsys, ["compare", str(a), str(b), "--output", str(tmp_path / "folder")]
    )
    assert eval_main(["compare", str(a), str(b), "--output", str(tmp_path / "r.json")]) == 0


def _images(tmp_path, count=3):
    paths = []
    for index in range(count):
        path = tmp_path / f"image{index}.png"
        Image.new("RGB", (48, 40), (40 * index, 255 - 60 * index, 100)).save(path)
        paths.append(path)
    return paths


def _manifest_of_images(tmp_path, paths):
    entries = [
        {"prompt": f"prompt {index}", "gen_image_path": str(path)}
        for index, path in enumerate(paths)
    ]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(entries))
    return path


def test_score_names_a_corrupt_image_before_loading_models(tmp_path, capsys):
    paths = _images(tmp_path)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])  # a truncated PNG
    manifest = _manifest_of_images(tmp_path, paths)
    save_clip_folder(tmp_path / "clip")

    def no_models(*_):
        raise AssertionError("models loaded before the images were checked")

    sources = scorers.WeightSources({"clip": str(tmp_path / "clip")})
    with pytest.raises(ValueError, match=r"image .*image1\.png \(prompt 'prompt 1'\) is unread"):
        score_manifest(manifest, ["clip"], sources, scorer_factory=no_models, log=lambda _: None)
    command = ["score", str(manifest), "--metrics", "clip", "--clip", str(tmp_path / "clip")]
    assert "image1.png" in _one_line_error(capsys, command)
    summary = score_manifest(manifest, ["clip"], sources, on_missing="skip", log=lambda _: None)
    assert [row["image"] for row in summary["unreadable_images"]] == [str(paths[1])]
    written = json.loads(manifest.read_text())
    assert ["scores" in entry for entry in written] == [True, False, True]
    assert summary["images"] == 2


def test_garbage_weights_name_the_file_and_flag(tmp_path, capsys):
    manifest = _manifest_of_images(tmp_path, _images(tmp_path, 1))
    save_clip_folder(tmp_path / "clip")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "empty_folder").mkdir()
    cases = [
        (["--metrics", "hpsv2", "--hpsv2", str(tmp_path / "garbage.pt")], "--hpsv2 "),
        (["--metrics", "hpsv2", "--hpsv2", str(tmp_path / "empty.pt")], "--hpsv2 "),
        (["--metrics", "imagereward", "--imagereward-tokenizer", str(tmp_path / "clip"),
          "--imagereward", str(tmp_path / "garbage.pt")], "--imagereward "),
        (["--metrics", "aesthetics", "--clip", str(tmp_path / "clip"),
          "--aesthetics-head", str(tmp_path / "empty_folder")], "--aesthetics-head "),
        (["--metrics", "aesthetics", "--clip", str(tmp_path / "clip"),
          "--aesthetics-head", str(tmp_path / "garbage.pt")], "--aesthetics-head "),
        (["--metrics", "clip", "--clip", str(tmp_path / "empty_folder")], "--clip "),
        (["--metrics", "clip", "--clip", str(tmp_path / "garbage.pt")], "--clip "),
    ]  # fmt: skip
    for flags, flag in cases:
        line = _one_line_error(capsys, ["score", str(manifest), *flags])
        assert flag in line and flags[-1] in line, line
    # A head of the wrong shape is an error naming the file, not a torch traceback.
    torch.save({"layers.0.weight": torch.zeros(3, 3)}, tmp_path / "head.pth")
    flags = ["--metrics", "aesthetics", "--clip", str(tmp_path / "clip"),
             "--aesthetics-head", str(tmp_path / "head.pth")]  # fmt: skip
    assert "does not fit the architecture" in _one_line_error(
        capsys, ["score", str(manifest), *flags]
    )


def test_generate_checks_pretrained_first_and_names_flags(tmp_path, capsys):
    not_a_pipeline = tmp_path / "folder"
    not_a_pipeline.mkdir()
    (not_a_pipeline / "config.json").write_text("{}")
    missing_suite = str(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"--pretrained .*not a diffusers pipeline folder"):
        generate(GenerateSettings(str(not_a_pipeline), missing_suite, str(tmp_path / "o")))
    command = ["generate", "--pretrained", str(not_a_pipeline), "--suite", missing_suite,
               "--output-dir", str(tmp_path / "o")]  # fmt: skip
    assert "--pretrained" in _one_line_error(capsys, command)
    with pytest.raises(FileNotFoundError, match="hf download"):
        generate(GenerateSettings(str(tmp_path / "nowhere"), missing_suite, str(tmp_path / "o")))
    # A pipeline folder that does not load is one line too (was a 25-line traceback).
    (not_a_pipeline / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps([{"prompt": "x"}]))
    command[4] = str(suite)
    assert "--pretrained" in _one_line_error(capsys, command)
    suite.write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(ValueError, match=r"^--suite: "):
        from sdpo.eval.manifest import load_entries

        load_entries(suite, "--suite")


def test_file_hash_covers_the_whole_file_and_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    for path, last in ((first, b"A"), (second, b"B")):
        with open(path, "wb") as handle:  # sparse: 65 MiB of zeros, one differing last byte
            handle.seek(65 * 2**20)
            handle.write(last)
    assert file_hash(str(first)) != file_hash(str(second))
    import hashlib

    assert file_hash(str(first)) == hashlib.sha256(first.read_bytes()).hexdigest()
    cache = json.loads((tmp_path / "cache" / "sdpo-eval" / "sha256.json").read_text())
    assert len(cache) == 2  # keyed by path, size and mtime: not re-read while unchanged
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"1")
    before = file_hash(str(folder))
    assert before is not None
    (folder / "model.safetensors").write_bytes(b"2")
    assert file_hash(str(folder)) != before
    assert file_hash(str(tmp_path / "absent")) is None


def test_clip_l_loads_once_for_clip_and_aesthetics(tmp_path, monkeypatch):
    save_clip_folder(tmp_path / "clip", projection_dim=768)
    torch.save(scorers.AestheticsScorer.build_head(768).state_dict(), tmp_path / "head.pth")
    manifest = _manifest_of_images(tmp_path, _images(tmp_path, 2))
    calls = []
    original = scorers._load_clip
    monkeypatch.setattr(scorers, "_load_clip", lambda *args: calls.append(args) or original(*args))
    sources = scorers.WeightSources(
        {"clip": str(tmp_path / "clip"), "aesthetics_head": str(tmp_path / "head.pth")}
    )
    summary = score_manifest(manifest, ["clip", "aesthetics"], sources, log=lambda _: None)
    assert len(calls) == 1 and set(summary["means"]) == {"clip", "aesthetics"}


def test_reference_conventions(tmp_path):
    model, _ = save_clip_folder(tmp_path / "clip", projection_dim=768)
    torch.save(scorers.AestheticsScorer.build_head(768).state_dict(), tmp_path / "head.pth")
    paths = _images(tmp_path, 2)
    images = [Image.open(path) for path in paths]
    prompts = ["the cat", "a dog"]
    sources = scorers.WeightSources(
        {
            "pickscore": str(tmp_path / "clip"),
            "pickscore_processor": str(tmp_path / "clip"),
            "clip": str(tmp_path / "clip"),
            "aesthetics_head": str(tmp_path / "head.pth"),
        }
    )
    cpu = torch.device("cpu")
    build = scorers.build_scorer

    def cosine(pixels):
        tokens = build("clip", sources, cpu).tokens(prompts)
        with torch.no_grad():
            image = model.get_image_features(pixel_values=pixels)
            text = model.get_text_features(
                input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
            )
        image = getattr(image, "pooler_output", image)
        text = getattr(text, "pooler_output", text)
        return torch.nn.functional.cosine_similarity(image, text)

    processed = cosine(preprocess.clip_processor_preprocess(images, 32))
    # PickScore: the reference prints the plain cosine, PickScore's own code logit_scale * cos.
    reference_pick = build("pickscore", sources, cpu, "reference").score(images, prompts)
    assert reference_pick == pytest.approx(processed.tolist(), abs=1e-5)
    default_pick = build("pickscore", sources, cpu).score(images, prompts)
    assert default_pick == pytest.approx((model.logit_scale.exp() * processed).tolist(), rel=1e-4)
    # CLIP score: the reference's is the open_clip ViT-H-14 cosine (the --pickscore-processor
    # model), open_clip's transform; the default is 100 * max(cos, 0) of ViT-L/14.
    reference_clip = build("clip", sources, cpu, "reference")
    assert reference_clip.preprocess is preprocess.open_clip_preprocess
    assert reference_clip.score(images, prompts) == pytest.approx(
        cosine(preprocess.open_clip_preprocess(images, 32)).tolist(), abs=1e-5
    )
    assert build("aesthetics", sources, cpu, "reference").preprocess is (
        preprocess.clip_processor_preprocess
    )
    assert build("aesthetics", sources, cpu).preprocess is preprocess.openai_clip_preprocess
    with pytest.raises(ValueError, match="conventions"):
        build("clip", sources, cpu, "paper")
    manifest = _manifest_of_images(tmp_path, paths)
    summary = score_manifest(
        manifest, ["pickscore"], sources, conventions="reference", log=lambda _: None
    )
    assert summary["conventions"] == "reference"
    written = json.loads((tmp_path / "manifest.json.scores.json").read_text())
    assert written["conventions"] == "reference"
    command = ["score", str(manifest), "--metrics", "pickscore", "--pickscore",
               str(tmp_path / "clip"), "--pickscore-processor", str(tmp_path / "clip")]  # fmt: skip
    manifest_prompts = [entry["prompt"] for entry in json.loads(manifest.read_text())]
    assert eval_main([*command, "--conventions", "reference"]) == 0
    scores = [entry["scores"]["pickscore"] for entry in json.loads(manifest.read_text())]
    expected = build("pickscore", sources, cpu, "reference").score(images, manifest_prompts)
    assert scores == pytest.approx(expected, abs=1e-5)
    assert eval_main(command) == 0  # default: logit_scale * cos
    scores = [entry["scores"]["pickscore"] for entry in json.loads(manifest.read_text())]
    scale = model.logit_scale.exp().item()
    assert scores == pytest.approx([scale * value for value in expected], rel=1e-4)
    written = json.loads((tmp_path / "manifest.json.scores.json").read_text())
    assert written["conventions"] == "default"


def test_imagereward_does_not_import_scorers():
    """Dependencies point one way: scorers -> imagereward -> preprocess (no import, even inside
    a function, of scorers from imagereward)."""
    import inspect

    from sdpo.eval import imagereward

    assert "scorers" not in inspect.getsource(imagereward)
    code = (
        "import sys, sdpo.eval.imagereward as ir; "
        "ir.ImageRewardModel(ir.vision_config(hidden_size=32, intermediate_size=64, "
        "num_hidden_layers=1, num_attention_heads=2, image_size=32), ir.text_config("
        "vocab_size=16, hidden_size=32, encoder_hidden_size=32, intermediate_size=64, "
        "num_hidden_layers=1, num_attention_heads=2)); "
        "assert 'sdpo.eval.scorers' not in sys.modules, 'import cycle'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _mirror(tmp_path):
    """A file:// mirror laid out as the official repository, and a file table for it."""
    import hashlib

    from sdpo.eval import fetch

    mirror = tmp_path / "mirror"
    table = {}
    for name, (remote, _, _) in fetch.OFFICIAL_FILES.items():
        content = f"stand-in for {remote}".encode()
        (mirror / remote).parent.mkdir(parents=True, exist_ok=True)
        (mirror / remote).write_bytes(content)
        table[name] = (remote, hashlib.sha256(content).hexdigest(), len(content))
    return mirror, table


def test_fetch_suites_from_a_local_mirror(tmp_path, monkeypatch, capsys):
    from sdpo.eval import fetch

    mirror, table = _mirror(tmp_path)
    monkeypatch.setattr(fetch, "OFFICIAL_FILES", table)
    arguments = ["fetch-suites", "--output-dir", str(tmp_path / "data"),
                 "--base-url", mirror.as_uri()]  # fmt: skip
    assert eval_main(arguments) == 0
    for name, (remote, _, _) in table.items():
        assert (tmp_path / "data" / name).read_bytes() == (mirror / remote).read_bytes()
    # Present with the right hash: not downloaded again.
    opened = []
    fetch.fetch_suites(tmp_path / "data", mirror.as_uri(), table, lambda url: opened.append(url))
    assert opened == []
    # A mirror serving other bytes: an error naming the URL, and nothing kept.
    (tmp_path / "data" / "prompts" / "papv2.json").unlink()
    (mirror / "prompts" / "papv2.json").write_bytes(b"tampered")
    line = _one_line_error(capsys, arguments, status=1)  # a download's failure, not an input's
    assert "papv2.json has sha256" in line and "expected" in line
    assert not (tmp_path / "data" / "prompts" / "papv2.json").exists()
    assert not list((tmp_path / "data").rglob("*.part"))
    # A network failure is one line too.
    assert "downloading" in _one_line_error(
        capsys, ["fetch-suites", "--output-dir", str(tmp_path / "x"), "--base-url",
                 (tmp_path / "nowhere").as_uri()], status=1,
    )  # fmt: skip


def test_fetch_suites_official_table(tmp_path):
    from sdpo.eval import fetch

    assert set(fetch.OFFICIAL_FILES) == {
        "prompts/papv2.json", "prompts/hpsv2.json", "prompts/partiprompts.json",
        "aesthetics/sac+logos+ava1-l14-linearMSE.pth",
    }  # fmt: skip
    assert fetch.OFFICIAL_COMMIT in fetch.OFFICIAL_BASE_URL
    requested = []

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *_):
            return False

        def read(self, _size):
            return b""

    def opener(url):
        requested.append(url)
        return Response()

    with pytest.raises(RunFailure, match="has sha256"):
        fetch.fetch_suites(tmp_path / "a", opener=opener, log=lambda _: None)
    # The head's "+" is percent-encoded in the raw URL.
    head_only = {k: v for k, v in fetch.OFFICIAL_FILES.items() if k.startswith("aesthetics")}
    with pytest.raises(RunFailure):
        fetch.fetch_suites(tmp_path / "b", files=head_only, opener=opener, log=print)
    assert requested[-1].endswith("utils/aesthetics_model/sac%2Blogos%2Bava1-l14-linearMSE.pth")


def test_compare_names_and_checks_the_conventions(tmp_path):
    a = _write_manifest(tmp_path / "a.json", [("p", {"clip": 1.0}), ("q", {"clip": 0.0})])
    b = _write_manifest(tmp_path / "b.json", [("p", {"clip": 0.5}), ("q", {"clip": 0.5})])
    for path, conventions in ((a, "reference"), (b, "reference")):
        Path(str(path) + ".scores.json").write_text(json.dumps({"conventions": conventions}))
    result = compare.compare(a, b, resamples=10)
    assert result["conventions"] == {"a": "reference", "b": "reference"}
    assert "Scored with --conventions reference." in compare.markdown(result)
    Path(str(b) + ".scores.json").write_text(json.dumps({"conventions": "default"}))
    with pytest.raises(ValueError, match=r"--conventions reference.*default"):
        compare.compare(a, b, resamples=10)
