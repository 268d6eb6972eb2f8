"""Never-exit token classes: the vocabulary mask and its effect on exits (tiny random model)."""

from __future__ import annotations

import pytest
from tiny_models import make_tiny_model, sharpen, tiny_engine

from octomil.config import EarlyExitSettings
from octomil.engine.token_classes import in_class
from octomil.engine.types import GenerationRequest, SamplingParams
from octomil.policy_file import NeverExit, PolicyFileError, load_policy_file

EXIT_ON = EarlyExitSettings(threshold=1.0, min_layers_fraction=0.25)
ALL = NeverExit(digits=True, code_identifiers=True, json_keys=True, strings=(" TODO",))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" 42", True),
        ("my_var", True),
        ("getValue", True),
        ("os.path", True),
        (' "name', True),
        ('{"', True),
        ("TODO", True),
        (" hello", False),
        (" Hello", False),
        ("_", False),
        ("", False),
    ],
)
def test_token_class_membership(text: str, expected: bool) -> None:
    assert in_class(text, ALL) is expected


def _run(engine, prompt=(5, 9, 13, 17)):
    request = GenerationRequest(prompt, SamplingParams(max_tokens=16), EXIT_ON)
    return [(e.token_id, e.layers_used) for e in engine.generate(request)]


def test_masked_tokens_never_leave_early_and_others_are_unchanged(byte_tokenizer) -> None:
    engine = tiny_engine(sharpen(make_tiny_model("llama")), byte_tokenizer, early_exit=EXIT_ON)
    free = _run(engine)
    exited = {t for t, layers in free if layers < engine.total_layers}
    assert exited, "the sharpened model exits"
    masked = sorted(exited)[0]
    engine.set_never_exit(NeverExit(strings=(byte_tokenizer.decode([masked]),)))
    assert engine.never_exit is not None and engine.never_exit[masked].item()
    kept = _run(engine)
    assert all(layers == engine.total_layers for t, layers in kept if t == masked)
    # Up to the first masked exit, decoding is the same token for token.
    first = next(k for k, (t, layers) in enumerate(free) if t == masked and layers < 30)
    assert kept[:first] == free[:first]


def test_policy_file_errors_name_the_line(tmp_path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("tasks:\n  chat: balanced\n  code: fastest\n")
    with pytest.raises(PolicyFileError, match=r"policy.yaml, line 3: task 'code': unknown"):
        load_policy_file(path)
    path.write_text("tasks:\n  chat: off\nnever_exit:\n  digits: yes please\n")
    with pytest.raises(PolicyFileError, match=r"line 4: never_exit.digits must be true or false"):
        load_policy_file(path)
    path.write_text("tasks: [\n")
    with pytest.raises(PolicyFileError, match=r"line \d+: invalid YAML"):
        load_policy_file(path)
    path.write_text("task:\n  chat: off\n")
    with pytest.raises(PolicyFileError, match=r"line 1: unknown section 'task'"):
        load_policy_file(path)


def test_example_policy_file_loads() -> None:
    from pathlib import Path

    example = Path(__file__).parents[2] / "configs" / "exit-policy.example.yaml"
    policy = load_policy_file(example)
    assert policy.tasks["json"] == EarlyExitSettings()
    assert policy.never_exit.digits and policy.never_exit.json_keys
