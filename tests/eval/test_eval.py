"""sdpo-eval on a CPU: compare arithmetic on hand-made manifests, every scorer's code path on
tiny random models, score_manifest, a tiny-pipeline generate, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import save_clip_folder, save_tiny_pipeline, tiny_clip, write_clip_tokenizer

from sdpo.eval import compare, preprocess, scorers
from sdpo.eval.cli import main as eval_main
from sdpo.eval.generate import GenerateSettings, diffusers_guidance, generate
from sdpo.eval.score import score_manifest


def manifest(path, rows):
    entries = [
        {"prompt": prompt, "gen_image_path": "", "raw_image_path": "", "metadata": {},
         "scores": scores}
        for prompt, scores in rows
    ]  # fmt: skip
    path.write_text(json.dumps(entries))
    return path


def test_compare_pairs_by_prompt_and_counts_ties_as_half(tmp_path):
    a = manifest(
        tmp_path / "a.json",
        [
            ("cat", {"pickscore": 21.0, "clip": 30.0}),
            ("dog", {"pickscore": 20.0, "clip": 31.0}),
            ("dog", {"pickscore": 19.0, "clip": 29.0}),  # a repeated prompt pairs by occurrence
            ("owl", {"pickscore": 18.0, "clip": 28.0}),
            ("only in a", {"pickscore": 99.0, "clip": 99.0}),
        ],
    )
    b = manifest(
        tmp_path / "b.json",
        [  # another order: pairing must not be by position
            ("owl", {"pickscore": 18.0, "clip": 27.0}),
            ("dog", {"pickscore": 20.5, "clip": 30.0}),
            ("cat", {"pickscore": 20.0, "clip": 32.0}),
            ("dog", {"pickscore": 18.0, "clip": 30.0}),
            ("only in b", {"pickscore": 0.0, "clip": 0.0}),
        ],
    )
    result = compare.compare(a, b, resamples=2000, seed=0)
    pick = result["metrics"]["pickscore"]
    # cat 21>20 win, dog#0 20<20.5 loss, dog#1 19>18 win, owl 18=18 tie.
    assert (pick["wins"], pick["losses"], pick["ties"], pick["n"]) == (2, 1, 1, 4)
    assert pick["win_rate_a"] == pytest.approx(2.5 / 4)
    clip = result["metrics"]["clip"]  # cat loss, dog#0 win, dog#1 loss, owl win
    assert (clip["wins"], clip["losses"], clip["ties"]) == (2, 2, 0)
    low, high = pick["ci95"]
    assert 0.0 <= low <= pick["win_rate_a"] <= high <= 1.0 and low < high
    assert result["unpaired"] == {"only_in_a": 1, "only_in_b": 1}
    assert result["unpaired_prompts"]["only_in_b"] == ["only in b"]
    assert compare.compare(a, b, resamples=2000, seed=0) == result  # deterministic
    text = compare.markdown(result)
    assert "| pickscore | 0.625 |" in text and "1 prompt(s) only in A" in text


def test_bootstrap_interval_narrows_with_more_prompts():
    few = compare.win_rate([(1.0, 0.0)] * 6 + [(0.0, 1.0)] * 4, resamples=4000)
    many = compare.win_rate([(1.0, 0.0)] * 600 + [(0.0, 1.0)] * 400, resamples=4000)
    assert few["win_rate_a"] == many["win_rate_a"] == pytest.approx(0.6)
    assert many["ci95"][1] - many["ci95"][0] < 0.1 < few["ci95"][1] - few["ci95"][0]
    assert many["ci95"][0] < 0.6 < many["ci95"][1]


def test_compare_cli_writes_json_markdown_plot_and_rejects_unscored(tmp_path):
    a = manifest(tmp_path / "a.json", [("x", {"hpsv2": 0.3}), ("y", {"hpsv2": 0.2})])
    b = manifest(tmp_path / "b.json", [("x", {"hpsv2": 0.1}), ("y", {"hpsv2": 0.25})])
    code = eval_main(
        ["compare", str(a), str(b), "--output", str(tmp_path / "out.json"),
         "--markdown", str(tmp_path / "out.md"), "--plot", str(tmp_path / "out.png")]
    )  # fmt: skip
    assert code == 0
    written = json.loads((tmp_path / "out.json").read_text())
    assert set(written["metrics"]["hpsv2"]) >= {"win_rate_a", "wins", "losses", "ties", "n", "ci95"}
    assert (tmp_path / "out.png").stat().st_size > 1000
    assert "hpsv2" in (tmp_path / "out.md").read_text()
    unscored = manifest(tmp_path / "c.json", [("x", {}), ("y", {})])
    with pytest.raises(ValueError, match="share no scored prompt"):
        compare.compare(a, unscored)


def _images(tmp_path, count=3):
    paths = []
    for index in range(count):
        path = tmp_path / f"image{index}.png"
        color = (40 * index, 255 - 60 * index, 100)
        Image.new("RGB", (48, 40), color).save(path)
        paths.append(path)
    return paths


def test_clip_family_scorers_on_tiny_models(tmp_path):
    model, _ = save_clip_folder(tmp_path / "clip", projection_dim=768)
    sources = scorers.WeightSources({"clip": str(tmp_path / "clip")})
    clip = scorers.build_scorer("clip", sources, torch.device("cpu"))
    images = [Image.open(path) for path in _images(tmp_path)]
    prompts = ["the red and green", "a cat", "the dog"]
    values = clip.score(images, prompts)
    # By hand: the same CLIP features, 100 * max(cos, 0).
    pixels = preprocess.clip_processor_preprocess(images, 32)
    assert pixels.shape == (3, 3, 32, 32)
    tokens = clip.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
        )
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    cosine = torch.nn.functional.cosine_similarity(image, text)
    assert values == pytest.approx((100 * cosine.clamp_min(0)).tolist(), rel=1e-4, abs=1e-4)

    pick_sources = scorers.WeightSources(
        {"pickscore": str(tmp_path / "clip"), "pickscore_processor": str(tmp_path / "clip")}
    )
    pick = scorers.build_scorer("pickscore", pick_sources, torch.device("cpu"))
    expected = (model.logit_scale.exp() * cosine).tolist()
    assert pick.score(images, prompts) == pytest.approx(expected, rel=1e-4)

    head = scorers.AestheticsScorer.build_head(768).eval()
    torch.save(head.state_dict(), tmp_path / "head.pth")
    assert set(head.state_dict()) == {
        f"layers.{index}.{kind}" for index in (0, 2, 4, 6, 7) for kind in ("weight", "bias")
    }  # the keys of LAION's sac+logos+ava1-l14-linearMSE.pth
    aesthetic_sources = scorers.WeightSources(
        {"clip": str(tmp_path / "clip"), "aesthetics_head": str(tmp_path / "head.pth")}
    )
    aesthetics = scorers.build_scorer("aesthetics", aesthetic_sources, torch.device("cpu"))
    with torch.no_grad():
        # The LAION head's original pipeline: OpenAI CLIP's torchvision transform.
        image = model.get_image_features(pixel_values=preprocess.openai_clip_preprocess(images, 32))
        image = getattr(image, "pooler_output", image)
        expected = head(torch.nn.functional.normalize(image, dim=-1)).squeeze(-1).tolist()
    assert aesthetics.score(images, prompts) == pytest.approx(expected, rel=1e-4, abs=1e-5)


def _open_clip_state(model) -> dict:
    """A tiny CLIPModel's weights under open_clip's names and layouts (fused qkv, x @ proj)."""
    state = {}
    own = model.state_dict()
    for tower, prefix in (("vision_model", "visual."), ("text_model", "")):
        layers = model.config.vision_config.num_hidden_layers
        for index in range(layers):
            source = f"{tower}.encoder.layers.{index}."
            target = f"{prefix}transformer.resblocks.{index}."
            state[target + "attn.in_proj_weight"] = torch.cat(
                [
                    own[source + f"self_attn.{name}.weight"]
                    for name in ("q_proj", "k_proj", "v_proj")
                ]
            )
            state[target + "attn.in_proj_bias"] = torch.cat(
                [own[source + f"self_attn.{name}.bias"] for name in ("q_proj", "k_proj", "v_proj")]
            )
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                                 ("mlp.fc2", "mlp.c_proj")):  # fmt: skip
                for kind in ("weight", "bias"):
                    state[f"{target}{theirs}.{kind}"] = own[f"{source}{ours}.{kind}"]
    state["visual.class_embedding"] = own["vision_model.embeddings.class_embedding"]
    state["visual.conv1.weight"] = own["vision_model.embeddings.patch_embedding.weight"]
    state["visual.positional_embedding"] = own["vision_model.embeddings.position_embedding.weight"]
    for ours, theirs in (("vision_model.pre_layrnorm", "visual.ln_pre"),
                         ("vision_model.post_layernorm", "visual.ln_post"),
                         ("text_model.final_layer_norm", "ln_final")):  # fmt: skip
        for kind in ("weight", "bias"):
            state[f"{theirs}.{kind}"] = own[f"{ours}.{kind}"]
    state["visual.proj"] = own["visual_projection.weight"].t()
    state["text_projection"] = own["text_projection.weight"].t()
    state["token_embedding.weight"] = own["text_model.embeddings.token_embedding.weight"]
    state["positional_embedding"] = own["text_model.embeddings.position_embedding.weight"]
    state["logit_scale"] = own["logit_scale"]
    return {f"module.{key}": value for key, value in state.items()}  # as HPS saves it


def test_hpsv2_checkpoint_maps_onto_clipmodel(tmp_path):
    _, vocab_size = write_clip_tokenizer(tmp_path / "tokenizer")
    original = tiny_clip(vocab_size, seed=1)
    torch.save({"state_dict": _open_clip_state(original)}, tmp_path / "hps.pt")
    loaded = tiny_clip(vocab_size, seed=2)
    scorers.load_strictly(
        loaded,
        scorers.open_clip_to_transformers(scorers.load_hpsv2_state(str(tmp_path / "hps.pt"))),
        "hps.pt",
    )
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match="does not fit the architecture"):
        scorers.load_strictly(tiny_clip(vocab_size), {"logit_scale": torch.zeros(())}, "x.pt")
    assert scorers.vit_h14_config().vision_config.num_hidden_layers == 32


def test_missing_weights_name_the_file_and_flag(tmp_path):
    sources = scorers.WeightSources({}, weights_root=str(tmp_path))
    with pytest.raises(scorers.MissingWeights, match=r"HPS_v2\.1_compressed\.pt.*--hpsv2"):
        scorers.build_scorer("hpsv2", sources, torch.device("cpu"))
    with pytest.raises(scorers.MissingWeights, match=r"--aesthetics-head"):
        scorers.build_scorer("aesthetics", sources, torch.device("cpu"))
    (tmp_path / "HPS_v2_compressed.pt").write_bytes(b"")  # v2.0 is found when v2.1 is absent
    assert sources.resolve("hpsv2", "--hpsv2") == str(tmp_path / "HPS_v2_compressed.pt")
    explicit = scorers.WeightSources({"clip": str(tmp_path / "nope")})
    with pytest.raises(scorers.MissingWeights, match=r"nope does not exist \(flag --clip\)"):
        scorers.build_scorer("clip", explicit, torch.device("cpu"))


def test_score_manifest_stores_scores_and_skips_missing(tmp_path):
    save_clip_folder(tmp_path / "clip")
    entries = [
        {"prompt": prompt, "gen_image_path": str(path), "raw_image_path": "", "metadata": {}}
        for prompt, path in zip(["a", "b", "c"], _images(tmp_path), strict=True)
    ]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(entries))
    sources = scorers.WeightSources({"clip": str(tmp_path / "clip")}, str(tmp_path / "empty"))
    summary = score_manifest(
        path, ["clip", "hpsv2"], sources, on_missing="skip", batch_size=2, log=lambda _: None
    )
    written = json.loads(path.read_text())
    assert [set(entry["scores"]) for entry in written] == [{"clip"}] * 3
    assert summary["means"]["clip"] == pytest.approx(
        sum(entry["scores"]["clip"] for entry in written) / 3
    )
    assert "hpsv2" in summary["skipped"] and summary["versions"]["torch"] == torch.__version__
    assert json.loads((tmp_path / "manifest.json.scores.json").read_text())["images"] == 3
    with pytest.raises(scorers.MissingWeights):
        score_manifest(path, ["hpsv2"], sources, log=lambda _: None)
    with pytest.raises(ValueError, match="metrics: unknown pickscor"):
        score_manifest(path, ["pickscor"], sources, log=lambda _: None)
    entries[1]["gen_image_path"] = str(tmp_path / "gone.png")
    path.write_text(json.dumps(entries))
    with pytest.raises(FileNotFoundError, match="1 image\\(s\\) missing"):
        score_manifest(path, ["clip"], sources, log=lambda _: None)


def test_generate_with_a_tiny_pipeline(tmp_path):
    pipeline = save_tiny_pipeline(tmp_path)
    suite = tmp_path / "suite.json"
    prompts = ["the cat", "a dog", "the owl", "unused"]
    suite.write_text(
        json.dumps(
            [
                {"prompt": p, "gen_image_path": "", "raw_image_path": "", "metadata": {}}
                for p in prompts
            ]
        )
    )
    common = dict(pretrained=str(pipeline), suite=str(suite), steps=2, limit=3, resolution=16)
    batched = generate(
        GenerateSettings(
            output_dir=str(tmp_path / "b2"), batch_size=2, cfg_formula="reference", **common
        )
    )
    entries = json.loads(batched.read_text())
    assert all(Path(entry["gen_image_path"]).is_absolute() for entry in entries)
    assert [entry["prompt"] for entry in entries] == prompts[:3]
    meta = json.loads((tmp_path / "b2" / "manifest.json.meta.json").read_text())
    assert meta["diffusers_guidance_scale"] == 8.5 and meta["cfg_formula"] == "reference"
    single = generate(GenerateSettings(output_dir=str(tmp_path / "b1"), batch_size=1, **common))

    # Seeds are per prompt: batch size changes an image only by batched-kernel rounding
    # (measured: at most 5 of 255), while another prompt's image differs by tens of levels.
    def pixels(entry):
        image = Image.open(entry["gen_image_path"])
        return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float()

    singles = json.loads(single.read_text())
    for first, second in zip(entries, singles, strict=True):
        assert (pixels(first) - pixels(second)).abs().max() <= 8
    assert (pixels(entries[0]) - pixels(singles[1])).abs().mean() > 4 * (
        pixels(entries[0]) - pixels(singles[0])
    ).abs().mean().clamp_min(0.25)
    # A trained UNet as a state dict replaces the pipeline's weights.
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet")
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    torch.save(unet.state_dict(), tmp_path / "unet.pth")
    changed = generate(
        GenerateSettings(
            output_dir=str(tmp_path / "trained"),
            unet=str(tmp_path / "unet.pth"),
            batch_size=2,
            cfg_formula="reference",
            **common,
        )
    )
    before = Image.open(entries[0]["gen_image_path"]).tobytes()
    after = Image.open(json.loads(changed.read_text())[0]["gen_image_path"]).tobytes()
    assert before != after


def test_generate_errors(tmp_path):
    assert diffusers_guidance(7.5, "reference") == 8.5
    assert diffusers_guidance(7.5, "diffusers") == 7.5
    with pytest.raises(ValueError, match="cfg_formula"):
        diffusers_guidance(7.5, "paper")
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(FileNotFoundError, match="--pretrained: no such folder"):
        generate(GenerateSettings(pretrained=str(tmp_path / "none"), suite=str(suite),
                                  output_dir=str(tmp_path / "o")))  # fmt: skip
    suite.write_text(json.dumps({"prompt": "x"}))
    assert eval_main(["generate", "--pretrained", str(tmp_path), "--suite", str(suite),
                      "--output-dir", str(tmp_path / "o")]) == 2  # fmt: skip


def _bert_tokenizer(folder):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "dog", "the", "on"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))  # positional: see tiny_models.py
    assert tokenizer("a red cat").input_ids == [2, 5, 6, 7, 3]
    return tokenizer, len(words)


def _tiny_imagereward(vocab_size, seed):
    from sdpo.eval import imagereward

    torch.manual_seed(seed)
    vision = imagereward.vision_config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32,
    )  # fmt: skip
    text = imagereward.text_config(
        vocab_size=vocab_size, hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=2, sep_token_id=3,
    )  # fmt: skip
    model = imagereward.ImageRewardModel(vision, text)
    model.head = scorers.AestheticsScorer.build_head(32)
    return model.eval()


def _original_names(model) -> dict:
    """The tiny model's weights under ImageReward.pt's names (BLIP's ViT and med BERT)."""
    vision_names = {
        "layer_norm1": "norm1", "self_attn.qkv": "attn.qkv", "self_attn.projection": "attn.proj",
        "layer_norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    }  # fmt: skip
    simple = {
        "embeddings.class_embedding": "cls_token",
        "embeddings.position_embedding": "pos_embed",
        "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
        "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
        "post_layernorm.weight": "norm.weight",
        "post_layernorm.bias": "norm.bias",
    }
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("text."):
            state["blip.text_encoder." + key.removeprefix("text.")] = value
        elif key.startswith("head."):
            state["mlp." + key.removeprefix("head.")] = value
        else:
            name = key.removeprefix("vision.")
            if name in simple:
                state["blip.visual_encoder." + simple[name]] = value
            else:
                _, _, index, rest = name.split(".", 3)
                module, _, kind = rest.rpartition(".")
                state[f"blip.visual_encoder.blocks.{index}.{vision_names[module]}.{kind}"] = value
    state["blip.vision_proj.weight"] = torch.zeros(4, 32)  # retrieval heads: unused
    state["blip.text_proj.weight"] = torch.zeros(4, 32)
    return state


def test_imagereward_checkpoint_layout_and_score(tmp_path):
    from sdpo.eval import imagereward

    tokenizer, vocab_size = _bert_tokenizer(tmp_path / "bert")
    original = _tiny_imagereward(vocab_size, seed=1)
    torch.save(_original_names(original), tmp_path / "ImageReward.pt")
    loaded = _tiny_imagereward(vocab_size, seed=2)
    state = imagereward.convert_checkpoint(
        imagereward.load_checkpoint(str(tmp_path / "ImageReward.pt"))
    )
    scorers.load_strictly(loaded, state, "ImageReward.pt")
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    scorer = imagereward.ImageRewardScorer(loaded, tokenizer, torch.device("cpu"))
    images = [Image.open(path) for path in _images(tmp_path)]
    values = scorer.score(images, ["a red cat", "the dog", "a cat on the dog"])
    assert len(values) == 3 and len(set(values)) == 3
    # The normalisation of ImageReward.score, by hand from the head's raw output.
    tokens = tokenizer(["a red cat"], padding="max_length", max_length=35, return_tensors="pt")
    pixels = preprocess.imagereward_preprocess(images[:1], 32)
    with torch.no_grad():
        image = loaded.vision(pixel_values=pixels).last_hidden_state
        text = loaded.text(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
            encoder_hidden_states=image,
        ).last_hidden_state  # fmt: skip
        raw = loaded.head(text[:, 0]).item()
    assert values[0] == pytest.approx((raw - 0.16717362830052426) / 1.0333394966054072, rel=1e-5)

    # The first token's feature (what the head reads) sees later tokens (bidirectional, not
    # causal) and the image (cross-attention).
    def first_token(image_index, prompt):
        tokens = tokenizer([prompt], padding="max_length", max_length=35, return_tensors="pt")
        with torch.no_grad():
            image = loaded.vision(
                pixel_values=preprocess.imagereward_preprocess(
                    images[image_index : image_index + 1], 32
                )
            ).last_hidden_state
            return loaded.text(
                input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                encoder_hidden_states=image,
            ).last_hidden_state[0, 0]  # fmt: skip

    reference_feature = first_token(0, "a red cat")
    assert (first_token(0, "a red dog") - reference_feature).abs().max() > 1e-3
    # BERT's 0.02-std initialisation makes the tiny model's cross-attention output ~1e-7 of the
    # residual: scale it up so the image's influence is measurable, and use noise images.
    with torch.no_grad():
        for layer in loaded.text.encoder.layer:
            layer.crossattention.output.dense.weight.mul_(1000.0)
    generator = torch.Generator().manual_seed(0)
    images[:2] = [
        Image.fromarray(
            torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8).numpy()
        )
        for _ in range(2)
    ]
    same = (first_token(0, "a red cat") - first_token(0, "a red cat")).abs().max()
    other = (first_token(1, "a red cat") - first_token(0, "a red cat")).abs().max()
    assert same == 0 and other > 1e-6
    with pytest.raises(ValueError, match="unexpected checkpoint entries"):
        imagereward.convert_checkpoint({"blip.text_decoder.x": torch.zeros(1)})
    with pytest.raises(scorers.MissingWeights, match=r"ImageReward\.pt.*--imagereward"):
        scorers.build_scorer("imagereward", scorers.WeightSources({}), torch.device("cpu"))


def test_compare_reports_metrics_scored_on_one_side_only(tmp_path):
    a = manifest(
        tmp_path / "a.json",
        [("x", {"clip": 0.3, "aesthetics": 5.0}), ("y", {"clip": 0.2, "aesthetics": None}),
         ("z", {"clip": 0.4})],
    )  # fmt: skip
    b = manifest(
        tmp_path / "b.json", [("x", {"clip": 0.1}), ("y", {"clip": 0.25}), ("z", {"clip": 0.5})]
    )
    result = compare.compare(a, b, resamples=500)
    assert set(result["metrics"]) == {"clip"} and result["metrics"]["clip"]["n"] == 3
    # aesthetics: x scored only in A, y null in A and absent in B, z absent on both sides.
    assert result["unscored"] == {"aesthetics": {"missing_in_a": 1, "missing_in_b": 2}}
    text = compare.markdown(result)
    assert "Metric aesthetics: 1 paired prompt(s) without a score in A, 2 in B" in text
    assert "\n\nMetric aesthetics" in text  # a paragraph after the table, not a table row


def test_score_cli_device_flag(tmp_path, capsys):
    save_clip_folder(tmp_path / "clip")
    entries = [
        {"prompt": prompt, "gen_image_path": str(path), "raw_image_path": "", "metadata": {}}
        for prompt, path in zip(["a", "b"], _images(tmp_path, count=2), strict=True)
    ]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(entries))
    command = ["score", str(path), "--metrics", "clip", "--clip", str(tmp_path / "clip")]
    assert eval_main([*command, "--device", "cpu"]) == 0
    assert [set(entry["scores"]) for entry in json.loads(path.read_text())] == [{"clip"}] * 2
    capsys.readouterr()
    assert eval_main([*command, "--device", "banana"]) == 2
    assert capsys.readouterr().err.startswith("sdpo-eval: error: --device 'banana'")
    if not torch.cuda.is_available():
        assert eval_main([*command, "--device", "cuda"]) == 2
        assert "CUDA is not available; use --device cpu" in capsys.readouterr().err


def _hf_cache_file(cache, repository, filename, commit="0123abcd"):
    """A file laid out as huggingface_hub caches it: refs/main names the snapshot."""
    folder = cache / f"models--{repository.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    path = folder / "snapshots" / commit / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    return path


def test_weights_found_in_the_local_hf_cache(tmp_path):
    cache = tmp_path / "hub"
    cache.mkdir()
    sources = scorers.WeightSources({}, hf_cache_dir=str(cache))
    with pytest.raises(scorers.MissingWeights, match=r"xswu/HPSv2 HPS_v2\.1_compressed\.pt"):
        sources.resolve("hpsv2", "--hpsv2")
    # Only v2.0 fetched: it is found; once v2.1 is there it wins, as with --weights-root.
    v20 = _hf_cache_file(cache, "xswu/HPSv2", "HPS_v2_compressed.pt")
    assert sources.resolve("hpsv2", "--hpsv2") == str(v20)
    v21 = _hf_cache_file(cache, "xswu/HPSv2", "HPS_v2.1_compressed.pt")
    assert sources.resolve("hpsv2", "--hpsv2") == str(v21)
    reward = _hf_cache_file(cache, "THUDM/ImageReward", "ImageReward.pt")
    assert sources.resolve("imagereward", "--imagereward") == str(reward)
    config = _hf_cache_file(cache, "openai/clip-vit-large-patch14", "config.json")
    assert sources.resolve("clip", "--clip") == str(config.parent)
    # --weights-root still comes before the cache.
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "ImageReward.pt").write_bytes(b"")
    rooted = scorers.WeightSources({}, str(tmp_path / "root"), hf_cache_dir=str(cache))
    assert rooted.resolve("imagereward", "--imagereward") == str(
        tmp_path / "root" / "ImageReward.pt"
    )


def exact_bootstrap_quantiles(wins: int, ties: int, losses: int, levels=(0.025, 0.975)):
    """The bootstrap distribution of the win rate computed exactly, not sampled: a resample of n
    prompts draws each outcome (1, 1/2, 0) with its observed frequency, so twice its total is a
    sum of n independent draws from {2, 1, 0}; its distribution is that draw's n-fold
    convolution. Returns, per level, the smallest rate whose cumulative probability reaches it."""
    n = wins + ties + losses
    step = np.array([losses, ties, wins], dtype=np.float64) / n  # P(0), P(1/2), P(1) in halves
    distribution = np.array([1.0])
    for _ in range(n):
        distribution = np.convolve(distribution, step)
    cumulative = np.cumsum(distribution)
    return [int(np.searchsorted(cumulative, level)) / (2 * n) for level in levels]


def test_bootstrap_interval_equals_the_exact_bootstrap_quantiles():
    # n = 400: one atom of the distribution is 1/800 of a win rate; the sampled quantiles (20000
    # resamples) land within one atom of the exact ones, while the 5th/95th percentiles would
    # sit ~6 atoms inside.
    wins, ties, losses = 230, 40, 130
    pairs = [(1.0, 0.0)] * wins + [(0.5, 0.5)] * ties + [(0.0, 1.0)] * losses
    result = compare.win_rate(pairs, resamples=20000, seed=3)
    assert result["win_rate_a"] == pytest.approx((wins + ties / 2) / 400)
    low, high = exact_bootstrap_quantiles(wins, ties, losses)
    atom = 1 / 800
    assert abs(result["ci95"][0] - low) <= atom + 1e-12
    assert abs(result["ci95"][1] - high) <= atom + 1e-12
    narrower = exact_bootstrap_quantiles(wins, ties, losses, levels=(0.05, 0.95))
    assert narrower[0] - low > 4 * atom and high - narrower[1] > 4 * atom


def test_bootstrap_interval_covers_the_true_rate_about_95_percent_of_the_time():
    # 300 data sets of 100 prompts drawn with a true win rate of 0.6 (seeded numpy, independent
    # of compare's torch generator): the percentile interval covers 0.6 in about 95% of them;
    # the binomial spread of the count over 300 sets is +-1.3%, so [0.90, 0.99] holds unless the
    # interval is wrong (a 90% interval covers ~90%, one without resampling ~0%).
    rng = np.random.default_rng(11)
    covered = 0
    for data_set in range(300):
        outcomes = rng.random(100) < 0.6
        pairs = [(1.0, 0.0) if won else (0.0, 1.0) for won in outcomes]
        low, high = compare.win_rate(pairs, resamples=1000, seed=data_set)["ci95"]
        covered += low <= 0.6 <= high
    assert 0.90 <= covered / 300 <= 0.99


def test_the_compare_plot_names_both_sides(tmp_path, monkeypatch):
    import matplotlib.axes

    titles = []
    real_set = matplotlib.axes.Axes.set

    def record(self, **kwargs):
        if "title" in kwargs:
            titles.append((kwargs["title"], kwargs["ylabel"]))
        return real_set(self, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "set", record)
    result = {
        "a": "runs/eval-base/manifest.json",
        "b": "runs/eval-sdpo/manifest.json",
        "metrics": {"pickscore": {"win_rate_a": 0.4, "ci95": [0.3, 0.5]}},
    }
    compare.plot(result, tmp_path / "plot.png")
    assert titles == [
        ("eval-base vs eval-sdpo, paired by prompt", "win rate of eval-base (95% CI)")
    ]
    assert compare.side_names("base.json", "tuned.json") == ("base", "tuned")
    assert compare.side_names("x/m.json", "x/m.json") == ("x/m.json", "x/m.json")
