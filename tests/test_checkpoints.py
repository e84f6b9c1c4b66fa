"""Resuming from checkpoints (issue 12): an explicit `--checkpoint STEP`, a fall-back past a
damaged newest checkpoint announced in one line, one file mode for both checkpoint files, and
every refusal of a checkpoint one line (exit 2), never a traceback, never running a pickle."""

import os
import pickle
import shutil
from pathlib import Path

import pytest

from stabilitylab.cli import main
from stabilitylab.experiment import load_experiment
from stabilitylab.store import RunWriter, StoreError, open_run
from stabilitylab.train.checkpoint import file_mode, load_checkpoint, resume_checkpoint
from stabilitylab.train.trainer import train

TINY = Path(__file__).resolve().parents[1] / "experiments" / "tiny.toml"
TIMING = {"tokens_per_s", "wall_time"}


def sets(cache):
    """6 steps, a checkpoint every 2 steps, all kept."""
    return [f"data.cache_dir={cache}", "train.checkpoint_every=2", "train.keep_checkpoints=0"]


def curve(lab, run_id):
    """What a run recorded that must not depend on where it was resumed from."""
    s = open_run(run_id, lab).scalars()
    s = s[~s["name"].isin(TIMING)]
    return list(zip(s["step"], s["name"], s["value"]))


@pytest.fixture(scope="module")
def lab(tmp_path_factory, corpus_cache):
    """'whole': 6 uninterrupted steps; 'killed': the same run stopped after step 5, with the
    checkpoints of steps 2 and 4."""
    lab = tmp_path_factory.mktemp("lab")
    exp = load_experiment(TINY, sets(corpus_cache))
    assert train(exp, lab, "whole", progress=False) == "finished"
    log = RunWriter.log

    def killed_at_step_6(writer, step, values):
        if step == 6:
            raise KeyboardInterrupt
        log(writer, step, values)

    RunWriter.log = killed_at_step_6
    try:
        with pytest.raises(KeyboardInterrupt):
            train(exp, lab, "killed", progress=False)
    finally:
        RunWriter.log = log
    assert sorted(set(open_run("killed", lab).checkpoints()["step"])) == [2, 4]
    return lab


def copy_of_killed(lab, tmp_path) -> Path:
    shutil.copytree(lab / "killed", tmp_path / "lab" / "killed")
    return tmp_path / "lab"


def resume(corpus_cache, lab, *extra) -> int:
    return main(["train", str(TINY), *[a for s in sets(corpus_cache) for a in ("--set", s)], "--lab", str(lab),
                 "--run-id", "killed", "--resume", "--no-progress", *map(str, extra)])


def damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one_in_one_line(
        lab, tmp_path, corpus_cache, capsys):
    copy = copy_of_killed(lab, tmp_path)
    damage(copy / "killed" / "checkpoints" / "step_000000004.safetensors")
    assert resume(corpus_cache, copy) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resuming from step 2, the newest intact checkpoint (step 4: missing or " \
                                      "damaged" in err
    assert curve(copy, "killed") == curve(lab, "whole")  # steps 3..6 retrained, bit for bit


def test_resume_checkpoint_step_continues_from_that_step(lab, tmp_path, corpus_cache, capsys):
    copy = copy_of_killed(lab, tmp_path)
    assert resume(corpus_cache, copy, "--checkpoint", 2) == 0
    events = open_run("killed", copy).events()
    assert "resumed after step 2" in " ".join(events.loc[events["kind"] == "resume", "detail"])
    assert curve(copy, "killed") == curve(lab, "whole")
    assert capsys.readouterr().err == ""  # nothing was skipped, nothing to announce


@pytest.mark.parametrize("break_it, extra, says", [
    (lambda run: None, ["--checkpoint", 3], "has no checkpoint of step 3 (indexed steps: 2, 4)"),
    (lambda run: damage(run / "checkpoints" / "step_000000002.state.pt"), ["--checkpoint", 2],
     "checkpoint of step 2 is missing or damaged"),
    (lambda run: [damage(p) for p in (run / "checkpoints").glob("*.safetensors")], [],
     "every checkpoint is missing or damaged (steps 4, 2)"),
])
def test_a_checkpoint_that_cannot_be_resumed_from_is_refused_in_one_line(lab, tmp_path, corpus_cache, capsys,
                                                                         break_it, extra, says):
    copy = copy_of_killed(lab, tmp_path)
    break_it(copy / "killed")
    assert resume(corpus_cache, copy, *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "Traceback" not in err


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_tampered_state_file_is_refused_in_one_line_and_never_runs(lab, tmp_path, corpus_cache, capsys,
                                                                     monkeypatch):
    """Even re-indexed (its sha256 matches), a state that would run code on unpickling is refused."""
    monkeypatch.chdir(tmp_path)
    copy = copy_of_killed(lab, tmp_path)
    state = copy / "killed" / "checkpoints" / "step_000000004.state.pt"
    state.write_bytes(pickle.dumps({"step": 4, "rng": Payload()}))
    with RunWriter.attach(copy / "killed") as writer:
        writer.add_checkpoint(4, state)
    assert resume(corpus_cache, copy) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step_000000004.state.pt: refused: not a training state that loads without " \
                                      "running code (UnpicklingError" in err
    assert not (tmp_path / "PWNED").exists()


def test_a_state_file_that_is_not_ours_is_refused_by_name(lab, tmp_path):
    import torch

    from stabilitylab.model import LoopedLM

    run = open_run("killed", lab)
    step, weights, state = resume_checkpoint(run)
    foreign = tmp_path / "foreign.state.pt"
    torch.save({"step": 4}, foreign)
    model = LoopedLM(load_experiment(TINY).model)
    assert load_checkpoint(model, weights, state, torch.device("cpu"))["step"] == step
    with pytest.raises(StoreError, match=r"foreign.state.pt: is not a training state of this lab \(no optimizers"):
        load_checkpoint(model, weights, foreign, torch.device("cpu"))


def test_both_checkpoint_files_get_the_mode_of_a_new_file(lab):
    files = list((lab / "whole" / "checkpoints").iterdir())
    assert {p.suffix for p in files} == {".safetensors", ".pt"}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(file_mode())}
    assert file_mode() == 0o666 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_checkpoint_without_resume_is_a_usage_error(tmp_path, capsys):
    assert main(["train", str(TINY), "--lab", str(tmp_path), "--checkpoint", "2"]) == 2
    assert "stabilitylab train: --checkpoint: picks the checkpoint a resume starts from. Add --resume" in \
        capsys.readouterr().err


def test_a_finished_run_is_not_rewound_by_checkpoint(lab, tmp_path, corpus_cache, capsys):
    shutil.copytree(lab / "whole", tmp_path / "lab" / "whole")
    code = main(["train", str(TINY), *[a for s in sets(corpus_cache) for a in ("--set", s)], "--lab",
                 str(tmp_path / "lab"), "--run-id", "whole", "--resume", "--checkpoint", "2", "--no-progress"])
    assert code == 2 and "is finished: a result, which a resume does not rewrite" in capsys.readouterr().err
