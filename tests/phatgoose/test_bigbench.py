import io
import json
import tarfile
from pathlib import Path

import pytest

from phatgoose.bigbench import (
    HELD_IN_TASKS,
    HELD_OUT_TASKS,
    _extract_task_files,
    available_tasks,
    load_bigbench_task,
    load_task_list,
)
from phatgoose.data import Example


def write_task(root: Path, name: str, examples: list[dict], **prefixes: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps({"name": name, "examples": examples, **prefixes}))
    return folder / "task.json"


def mc(text: str, scores: dict[str, float]) -> dict:
    return {"input": text, "target_scores": scores}


def numbered(n: int) -> list[dict]:
    return [mc(f"q{i}", {"yes": 1, "no": 0}) for i in range(n)]


def test_prompt_uses_the_task_prefixes(tmp_path):
    write_task(
        tmp_path,
        "prefixed",
        [mc("2+2?", {"4": 1, "5": 0})],
        task_prefix="Math.\n",
        example_input_prefix="\nQuestion: ",
        example_output_prefix="\nAnswer:",
    )
    split = load_bigbench_task("prefixed", n_eval=1, tasks_dir=tmp_path)
    assert split.evaluation == [
        Example(prompt="Math.\n\nQuestion: 2+2?\nAnswer:", choices=("4", "5"), answer=0)
    ]


def test_prompt_defaults_to_q_and_a_prefixes(tmp_path):
    write_task(tmp_path, "plain", [mc("Is it?", {"no": 0, "yes": 1})])
    split = load_bigbench_task("plain", n_eval=1, tasks_dir=tmp_path)
    assert split.evaluation[0].prompt == "\nQ: Is it?\nA: "
    assert (split.input_prefix, split.output_prefix, split.task_prefix) == ("\nQ: ", "\nA: ", "")


def test_answer_is_the_highest_scored_choice(tmp_path):
    write_task(tmp_path, "graded", [mc("x", {"a": 0.25, "b": 1.0, "c": 0.5})])
    example = load_bigbench_task("graded", n_eval=1, tasks_dir=tmp_path).evaluation[0]
    assert example.choices == ("a", "b", "c")
    assert example.answer == 1


def test_examples_without_target_scores_are_dropped(tmp_path):
    examples = [
        mc("kept", {"a": 1, "b": 0}),
        {"input": "generative", "target": "free text"},
        mc("no correct choice", {"a": 0, "b": 0}),
    ]
    write_task(tmp_path, "mixed", examples)
    split = load_bigbench_task("mixed", n_eval=5, tasks_dir=tmp_path)
    assert [e.prompt for e in split.evaluation] == ["\nQ: kept\nA: "]
    assert split.dropped == 2


def test_split_is_deterministic_for_a_seed(tmp_path):
    write_task(tmp_path, "many", numbered(30))
    first = load_bigbench_task("many", n_eval=10, seed=7, tasks_dir=tmp_path)
    second = load_bigbench_task("many", n_eval=10, seed=7, tasks_dir=tmp_path)
    other_seed = load_bigbench_task("many", n_eval=10, seed=8, tasks_dir=tmp_path)
    assert first.evaluation == second.evaluation
    assert first.training == second.training
    assert first.evaluation != other_seed.evaluation


def test_split_is_disjoint_and_complete(tmp_path):
    write_task(tmp_path, "many", numbered(30))
    split = load_bigbench_task("many", n_eval=10, tasks_dir=tmp_path)
    evaluation = {e.prompt for e in split.evaluation}
    training = {e.prompt for e in split.training}
    assert len(evaluation) == 10
    assert len(training) == 20
    assert not evaluation & training
    assert evaluation | training == {f"\nQ: q{i}\nA: " for i in range(30)}


def test_split_is_a_seeded_shuffle_not_file_order(tmp_path):
    write_task(tmp_path, "many", numbered(30))
    split = load_bigbench_task("many", n_eval=10, tasks_dir=tmp_path)
    assert [e.prompt for e in split.evaluation] != [f"\nQ: q{i}\nA: " for i in range(10)]


def test_a_task_file_path_loads_directly(tmp_path):
    path = write_task(tmp_path, "direct", numbered(3))
    assert load_bigbench_task(path, n_eval=1).name == "direct"
    assert len(load_bigbench_task(path.parent, n_eval=1).training) == 2


def test_subtasks_load_by_parent_slash_name(tmp_path):
    write_task(tmp_path, "parent/sub_a", numbered(4))
    split = load_bigbench_task("parent/sub_a", n_eval=2, tasks_dir=tmp_path)
    assert split.name == "parent/sub_a"
    assert available_tasks(tmp_path) == ["parent/sub_a"]


def test_missing_task_suggests_close_names(tmp_path):
    write_task(tmp_path, "hyperbaton", numbered(2))
    with pytest.raises(FileNotFoundError, match="did you mean: hyperbaton"):
        load_bigbench_task("hyperbatton", n_eval=1, tasks_dir=tmp_path)


def test_task_without_multiple_choice_examples_is_an_error(tmp_path):
    write_task(tmp_path, "generative", [{"input": "a", "target": "b"}])
    write_task(tmp_path, "generative/part", numbered(2))
    with pytest.raises(ValueError, match=r"no multiple-choice examples.*subtasks: part"):
        load_bigbench_task("generative", n_eval=1, tasks_dir=tmp_path)


def test_bad_json_names_the_file(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "task.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken/task\.json: not valid JSON"):
        load_bigbench_task("broken", n_eval=1, tasks_dir=tmp_path)


def test_non_numeric_scores_name_the_example(tmp_path):
    write_task(tmp_path, "odd", [mc("ok", {"a": 1, "b": 0}), mc("bad", {"a": "high", "b": 0})])
    with pytest.raises(ValueError, match=r"examples\[1\]\.target_scores"):
        load_bigbench_task("odd", n_eval=1, tasks_dir=tmp_path)


def test_negative_n_eval_is_refused(tmp_path):
    write_task(tmp_path, "t", numbered(2))
    with pytest.raises(ValueError, match="n_eval must be >= 0"):
        load_bigbench_task("t", n_eval=-1, tasks_dir=tmp_path)


def test_task_list_from_a_file_skips_comments_and_blanks(tmp_path):
    path = tmp_path / "tasks.txt"
    path.write_text("# held-in\nhyperbaton\n\nnavigate  # a comment\nhyperbaton\n")
    assert load_task_list(path) == ["hyperbaton", "navigate"]


def test_task_list_from_a_comma_separated_string():
    assert load_task_list(" hyperbaton, navigate,,") == ["hyperbaton", "navigate"]


def test_a_task_list_longer_than_a_file_name_is_read_as_names():
    # The whole default suite on the command line is over 255 characters.
    names = [*HELD_IN_TASKS, *HELD_OUT_TASKS]
    assert len(",".join(names)) > 255
    assert load_task_list(",".join(names)) == names


def test_empty_task_list_is_an_error():
    with pytest.raises(ValueError, match="no task names"):
        load_task_list(" , ")


def test_missing_task_list_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.txt does not exist"):
        load_task_list(tmp_path / "missing.txt")


def test_default_suites_match_the_benchmark():
    assert len(HELD_IN_TASKS) == 12
    assert len(HELD_OUT_TASKS) == 13
    assert not set(HELD_IN_TASKS) & set(HELD_OUT_TASKS)


def make_sdist(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_extraction_keeps_only_task_files_below_benchmark_tasks(tmp_path):
    sdist = make_sdist(
        tmp_path / "bigbench-1.0.0.tar.gz",
        {
            "bigbench-1.0.0/setup.py": b"",
            "bigbench-1.0.0/bigbench/benchmark_tasks/a/task.json": b"{}",
            "bigbench-1.0.0/bigbench/benchmark_tasks/a/README.md": b"",
            "bigbench-1.0.0/bigbench/benchmark_tasks/b/sub/task.json": b"{}",
            "bigbench-1.0.0/bigbench/benchmark_tasks/task.json": b"{}",
        },
    )
    count = _extract_task_files(sdist, tmp_path / "out", progress=False)
    assert count == 2
    files = sorted(
        p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*")
    )
    assert files == ["a", "a/task.json", "b", "b/sub", "b/sub/task.json"]


def test_extraction_rejects_paths_that_escape(tmp_path):
    sdist = make_sdist(
        tmp_path / "evil.tar.gz",
        {"bigbench-1.0.0/bigbench/benchmark_tasks/../../../etc/task.json": b"{}"},
    )
    with pytest.raises(RuntimeError, match="unsafe path"):
        _extract_task_files(sdist, tmp_path / "out", progress=False)
