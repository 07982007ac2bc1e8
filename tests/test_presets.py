"""--model presets (configs/*.yaml): a preset fills the flags a command line leaves out, explicit flags win,
and the presets are the documentation's model shapes and quick start."""

import shlex


import bench
import pretrain
from conftest import fails_with_one_line
from data import VOCABULARY_SIZES
from helpers import model_shapes, section, tiktoken_vocabulary
from run_config import MODEL_PRESETS

SHAPE = ("embedding_dimensions", "num_attention_heads", "num_hidden_layers")


def shape(args) -> tuple[int, int, int]:
    return tuple(getattr(args, k) for k in SHAPE)


def test_a_preset_fills_the_shape_and_the_tokenizer():
    args = pretrain.parse_args(["--model", "large"])
    assert shape(args) == (4096, 64, 32) and args.token_encoding == "cl100k_base"
    args = pretrain.parse_args(["--model", "xxxlarge"])
    assert shape(args) == (8192, 128, 128) and args.token_encoding == "o200k_base"
    args = bench.parse_args(["train", "--model", "xlarge"])  # bench's random model takes the vocabulary
    assert shape(args) == (4096, 64, 64) and args.vocabulary_size == 100_277


def test_the_default_is_the_small_shape_as_before():
    assert pretrain.parse_args([]) == pretrain.parse_args(["--model", "small"])
    args = pretrain.parse_args([])
    assert args.model == "small" and shape(args) == (1024, 16, 24) and args.token_encoding == "r50k_base"
    assert args.dataset == "HuggingFaceFW/fineweb" and args.device == "cuda" and args.seed is None
    args = bench.parse_args(["train"])
    assert shape(args) == (1024, 16, 24) and args.vocabulary_size == 50_257 and args.batch_size == 16


def test_explicit_flags_override_the_preset():
    args = pretrain.parse_args(["--model", "large", "--num_hidden_layers", "2", "--token_encoding", "bytes"])
    assert shape(args) == (4096, 64, 2) and args.token_encoding == "bytes"
    # a flag given with its default value still wins: the preset fills only what the command line leaves out
    args = pretrain.parse_args(["--model", "quickstart", "--device", "cuda", "--embedding_dimensions", "1024"])
    assert args.device == "cuda" and args.embedding_dimensions == 1024 and args.num_hidden_layers == 4
    args = pretrain.parse_args(["--model", "quickstart", "--dataset", "HuggingFaceFW/fineweb",
                                "--checkpoint_path", "./checkpoints/checkpoint.pt"])
    assert args.dataset == "HuggingFaceFW/fineweb" and args.checkpoint_path == "./checkpoints/checkpoint.pt"
    args = bench.parse_args(["train", "--model", "medium", "--vocabulary_size", "300", "--embedding_dimensions", "64"])
    assert shape(args) == (64, 32, 32) and args.vocabulary_size == 300


def test_an_unknown_model_is_one_line(capsys):
    fails_with_one_line(capsys, pretrain, ["--model", "huge"], "--model", "'huge'", "small", "xxxlarge", "quickstart")
    fails_with_one_line(capsys, bench, ["train", "--model", "Small"], "--model", "'Small'")


def test_model_quickstart_is_the_readme_quick_start_command():
    text = section("# Quick start")
    command = text[text.index("python pretrain.py --dataset builtin"):]
    command = command[: command.index("```")].replace("\\\n", " ")
    argv = shlex.split(command)[2:]  # past "python pretrain.py"
    readme, preset = vars(pretrain.parse_args(argv)), vars(pretrain.parse_args(["--model", "quickstart"]))
    assert readme.pop("model") == "small" and preset.pop("model") == "quickstart"
    assert preset == readme


def test_presets_are_the_readme_model_shapes_with_their_vocabularies(monkeypatch):
    rows = model_shapes()
    assert [name for _, _, _, name in rows] == ["small", "medium", "large", "xlarge", "xxlarge", "xxxlarge"]
    for _, config, _, name in rows:
        preset = MODEL_PRESETS[name]
        assert (preset["embedding_dimensions"], preset["num_attention_heads"], preset["num_hidden_layers"],
                VOCABULARY_SIZES[preset["token_encoding"]]) == (
            config.embedding_dimensions, config.num_attention_heads, config.num_hidden_layers,
            config.vocabulary_size), name
    for encoding, size in VOCABULARY_SIZES.items():
        assert size == (257 if encoding == "bytes" else tiktoken_vocabulary(encoding, monkeypatch)), encoding


def test_every_preset_key_is_a_pretrain_flag():
    """So a shipped preset is also a config file: `--config configs/NAME.yaml` takes it whole."""
    flags = set(vars(pretrain.parse_args([])))
    for name, preset in MODEL_PRESETS.items():
        assert set(preset) <= flags, (name, set(preset) - flags)
        by_config = vars(pretrain.parse_args(["--config", f"configs/{name}.yaml"]))
        by_name = vars(pretrain.parse_args(["--model", name]))
        for args in (by_config, by_name):
            del args["config"], args["model"]
        assert by_config == by_name, name
