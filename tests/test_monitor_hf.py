"""LoopMonitor in the real transformers Trainer (needs the `hf-trainer` extra, accelerate):
a tiny random HRM-Text trained a few steps with trainer_callback writes a run that
`stabilitylab runs` and `events` read."""

import math

import pytest
import torch

pytest.importorskip("accelerate")
from transformers import HrmTextConfig, HrmTextForCausalLM, Trainer, TrainingArguments  # noqa: E402

from stabilitylab import records  # noqa: E402
from stabilitylab.cli import main  # noqa: E402
from stabilitylab.formats.hrm_text import HrmTextLoop  # noqa: E402
from stabilitylab.monitor import LoopMonitor, MonitorConfig, trainer_callback  # noqa: E402
from stabilitylab.store import list_runs, open_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             head_dim=16, max_position_embeddings=32, H_cycles=2, L_cycles=1)
STEPS = 4


class Windows(torch.utils.data.Dataset):
    """Random token windows, each its own next-token target (the model shifts labels)."""

    def __init__(self, n: int = 16, seq: int = 16):
        self.ids = torch.randint(0, SMALL["vocab_size"], (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_the_transformers_trainer_with_the_callback_writes_a_run_the_labs_readers_read(tmp_path, capsys):
    torch.manual_seed(0)
    lm = HrmTextForCausalLM(HrmTextConfig(**SMALL))
    data = Windows()
    monitor = LoopMonitor(HrmTextLoop(lm), tmp_path / "lab", "hrm", config=MonitorConfig(spectrum_every=1, radius_every=1),
                          probe_tokens=data.ids[:1])  # the same parameters as the Trainer's model
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=2,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    Trainer(model=lm, args=args, train_dataset=data, callbacks=[trainer_callback(monitor)]).train()

    runs = list_runs(tmp_path / "lab")
    assert list(runs["run_id"]) == ["hrm"] and runs["status"][0] == "finished" and runs["last_step"][0] == STEPS
    run = open_run("hrm", tmp_path / "lab")
    values = run.scalars([records.LOSS, records.GRAD_NORM, records.LR, records.RADIUS_ESTIMATE])
    per_name = values.groupby("name")["step"].apply(list).to_dict()
    assert all(per_name[name] == list(range(1, STEPS + 1)) for name in per_name) and len(per_name) == 4
    assert all(math.isfinite(v) and v > 0 for v in values["value"])
    assert run.spectra().empty  # HRM-Text has no linear part: no spectrum, and no error either
    assert records.PROBE_ERROR not in set(run.events()["kind"])
    assert main(["runs", str(tmp_path / "lab")]) == 0 and main(["events", str(run.path)]) == 0
    assert "hrm" in capsys.readouterr().out
