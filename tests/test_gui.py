"""The Jupyter panels: headless (widgets driven from Python) and in a real browser (JupyterLab + Debian's chromium)."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from jora.data import format_prompt
from jora.form import command_line
from jora.gui import PANEL_NOTEBOOK, panels, write_panel_notebook
from jora.testing import save_tiny_hf_checkpoint
from jora.files import latest_checkpoint
from jora.config import ParallamaConfig, config_from_toml
from jora.cli import demo_config
from jora.testing import demo_raft_records

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gui")
    records = demo_raft_records(96)
    (folder / "raft.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    save_tiny_hf_checkpoint(folder / "tiny-llama", "llama3.1", corpus=[format_prompt(r) + r["output"] for r in records])
    return folder


def test_start_trains_and_updates_history_and_plot(workspace):
    ui = panels(demo_config(workspace, N_EPOCHS=1, EVAL_EVERY=3), workspace / "raft.jsonl", workspace / "run")
    training = ui.training
    assert not training.start_button.disabled and "jora train --data" in training.command.value
    training.fields["LORA_R"].value = "4"
    assert "--lora-r 4" in training.command.value  # the command follows the form
    assert training.start()
    assert training.start_button.disabled and not training.stop_button.disabled
    training.wait(600)
    assert training.error is None, training.log.value
    assert len(training.history) == 10 and training.history[-1]["step"] == 10
    assert any("eval_loss" in record for record in training.history)
    assert training.plot.value[:4] == b"\x89PNG" and training.progress.value == training.progress.max == 10
    assert "finished at step 10" in training.status.value and "train split:" in training.log.value
    assert latest_checkpoint(workspace / "run").name == "step-00000010"
    assert not training.start_button.disabled and training.stop_button.disabled


def test_stop_saves_and_ends_cleanly(workspace):
    ui = panels(demo_config(workspace, N_EPOCHS=50), workspace / "raft.jsonl", workspace / "stopped")
    training = ui.training
    original = training._on_event

    def stop_after_three(event, info):
        original(event, info)
        if event == "step" and info["step"] == 3:
            training.stop_button.click()

    training._on_event = stop_after_three
    training.start()
    training.wait(600)
    assert training.result.stopped_early and len(training.history) == 3
    assert latest_checkpoint(workspace / "stopped").name == "step-00000003"
    assert "stopped at step 3" in training.status.value


@pytest.mark.parametrize("changes, field, message", [
    ({"LORA_R": "0"}, "LORA_R", "must be at least 1"),
    ({"LORA_R": "abc"}, "LORA_R", "takes a whole number"),
    ({"LORA_R": "2.5"}, "LORA_R", "takes a whole number"),
    ({"LR": "fast"}, "LR", "takes a finite number"),
    ({"LORA_DROPOUT": "1.5"}, "LORA_DROPOUT", "must be between 0 and 0.999"),
    ({"LLAMA2_HF_PATH": "/nowhere"}, "LLAMA2_HF_PATH", "no config.json in /nowhere"),
    ({"NUM_GPUS": "", "MESH_MODEL": "3"}, "MESH_MODEL", "cannot split this model: its 8 attention heads"),
    ({"NUM_GPUS": "4", "MESH_DATA": "2", "MESH_MODEL": "4"}, "MESH_DATA", "= 8 devices, but 4 devices are in use"),
    ({"NUM_GPUS": "99"}, "NUM_GPUS", "only 8 devices are visible"),
    ({"MAX_STEPS": "many"}, "MAX_STEPS", "takes a whole number (or none)"),
    ({"ALPACA_MIX": "0.3"}, "ALPACA_PATH", "needs an existing general-instruction file"),
], ids=lambda value: None if isinstance(value, (dict, str)) and not isinstance(value, dict) else None)
def test_invalid_values_show_errors_and_block_start(workspace, changes, field, message):
    ui = panels(demo_config(workspace), workspace / "raft.jsonl", workspace / "never")
    training = ui.training
    for name, value in changes.items():
        training.fields[name].value = value
    assert message in training.errors[field].value, (field, training.errors[field].value)
    assert training.start_button.disabled and not training.start()
    assert not (workspace / "never").exists()


def test_missing_data_file_blocks_start(workspace):
    ui = panels(demo_config(workspace), workspace / "absent.jsonl", workspace / "never")
    assert "existing JSON/JSONL" in ui.training.errors["data_path"].value and ui.training.start_button.disabled


def test_every_field_is_on_the_form():
    from jora.form import FIELD_GROUPS
    assert sorted(sum(FIELD_GROUPS.values(), [])) == sorted(ParallamaConfig._fields)


def test_command_line_round_trips_through_jora_train_parser():
    from jora.cli import config_from_arguments, train_argument_parser
    config = ParallamaConfig(LLAMA2_HF_PATH="m", LORA_R=8, LORA_TARGETS=("q_proj", "o_proj"), USE_RSLORA=True, MAX_STEPS=7)
    arguments = train_argument_parser().parse_args(command_line(config, "d.jsonl", "c").split()[2:])
    assert config_from_arguments(arguments) == config


# ---- in a real browser ----

def free_port():
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def box(page, label: str):
    "The input of the panel's text box labelled `label`."
    return page.locator(f".widget-text:has(label:text-is('{label}')) input").first


def tab(page, title: str):
    "A tab header whose title starts with `title` (the form's headers may carry an error count after it)."
    return page.locator(".lm-TabBar-tab", has_text=title).first


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (apt-get install chromium)")
def test_panels_in_jupyterlab_in_a_real_browser(workspace, tmp_path):
    """A person's session in JupyterLab: an invalid form with its errors on two tabs, settings saved and read back, a
    full run with its progress line (ETA included), and an export with an empty path refused. Screenshots of each."""
    from playwright.sync_api import expect, sync_playwright
    config = demo_config(workspace, N_EPOCHS=4, EVAL_EVERY=10, CHECKPOINT_EVERY=20)
    write_panel_notebook(tmp_path, config, workspace / "raft.jsonl", tmp_path / "checkpoints")
    port = free_port()
    lab_settings = tmp_path / ".lab-settings"  # no "Jupyter news?" notice over the panels in the screenshots
    (lab_settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (lab_settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        '{"fetchNews": "false"}')
    environment = {**os.environ, "JUPYTER_PLATFORM_DIRS": "1", "XLA_FLAGS": "", "JUPYTERLAB_SETTINGS_DIR": str(lab_settings)}
    server = subprocess.Popen([sys.executable, "-m", "jora.gui", "--folder", str(tmp_path), "--port", str(port),
                               "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=environment, start_new_session=True)
    shots = {}
    try:
        url = re.search(r"jora panels: (\S+)", server.stdout.readline()).group(1)
        token = url.split("token=")[1]
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://localhost:{port}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("JupyterLab did not start")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 2600})  # the whole panel in view

            def shot(name):
                shots[name] = tmp_path / f"{name}.png"
                page.locator(".jp-OutputArea").first.screenshot(path=str(shots[name]))

            page.goto(url)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            page.wait_for_selector("text=Python 3 (ipykernel) | Idle", timeout=120_000)  # the kernel is up
            page.click("li.lm-MenuBar-item:has-text('Run')")
            page.click("li.lm-Menu-item:has-text('Run All Cells')")
            start = page.locator("button.jupyter-button:has-text('Start')")
            start.wait_for(timeout=180_000)
            assert "jora train --data" in page.inner_text(".jp-OutputArea")
            expect(start).to_be_enabled(timeout=60_000)

            # an invalid form: errors on two tabs, each visible on its tab and counted on its header
            tab(page, "LoRA").click()
            box(page, "lora r").fill("0")
            tab(page, "Optimisation").click()
            box(page, "max steps").fill("ten")
            box(page, "max steps").press("Tab")
            expect(page.get_by_text("takes a whole number (or none), not 'ten'")).to_be_visible(timeout=30_000)
            expect(tab(page, "LoRA")).to_contain_text("\u26a0 1")
            expect(tab(page, "Optimisation")).to_contain_text("\u26a0 1")
            expect(page.get_by_text("No command yet: fix 2 fields first")).to_be_visible()
            expect(start).to_be_disabled()
            shot("invalid-form")
            tab(page, "LoRA").click()
            expect(page.get_by_text("must be at least 1, not '0'")).to_be_visible()
            box(page, "lora r").fill("8")
            tab(page, "Optimisation").click()
            box(page, "max steps").fill("40")
            box(page, "max steps").press("Tab")
            expect(start).to_be_enabled(timeout=30_000)
            command = page.inner_text(".jp-OutputArea")
            assert "--lora-r 8 " in command and "--max-steps 40 " in command

            # settings saved, the form changed, the settings read back
            box(page, "settings file").fill(str(tmp_path / "run.toml"))
            page.click("button.jupyter-button:has-text('Save settings')")
            expect(page.get_by_text(f"settings file: written to {tmp_path / 'run.toml'}")).to_be_visible(timeout=30_000)
            box(page, "max steps").fill("7")
            box(page, "max steps").press("Tab")
            page.click("button.jupyter-button:has-text('Load settings')")
            expect(page.get_by_text(f"settings file: read from {tmp_path / 'run.toml'}")).to_be_visible(timeout=30_000)
            expect(box(page, "max steps")).to_have_value("40")

            # the data as it will be tokenized, before training
            page.click("button.jupyter-button:has-text('Preview data')")
            expect(page.get_by_text("text as tokenized (answer highlighted)")).to_be_visible(timeout=60_000)

            # a full run: the progress line (counts, ETA, tokens/s) while it trains, then the plot and the end
            page.evaluate("""() => { window.sawEta = false; new MutationObserver(() => {
                if (document.body.innerText.match(/step \\d+\\/40 .*ETA/)) window.sawEta = true; })
                .observe(document.body, {subtree: true, childList: true, characterData: true}); }""")
            start.click()
            page.wait_for_function("() => window.sawEta", timeout=300_000)
            page.wait_for_function("() => document.body.innerText.includes('finished at step 40')", timeout=300_000)
            page.wait_for_function("() => [...document.querySelectorAll('img.widget-image')].some(i => i.naturalWidth > 100)",
                                   timeout=60_000)
            shot("finished-run")
            text = page.inner_text(".jp-OutputArea")
            log = page.locator(".jora-log textarea").input_value()

            # the run's checkpoint beside the base model
            tab(page, "Evaluate").click()
            box(page, "test examples").fill("4")
            page.click("button.jupyter-button:has-text('Evaluate')")
            expect(page.get_by_text("with adapter (step 40)")).to_be_visible(timeout=300_000)
            shot("evaluation")
            table = page.locator("table.dataframe").inner_text()

            # export: an empty path is refused, nothing is written
            tab(page, "Export").click()
            page.click("button.jupyter-button:has-text('Save adapter')")
            expect(page.get_by_text("No folder given for the PEFT adapter")).to_be_visible(timeout=30_000)
            shot("export-refused")
            browser.close()
        assert "finished at step 40" in text and "tokens/s" in text and "Equivalent command" in text
        assert "checkpoint:" in log and "train split:" in log  # the log area
        assert "base model" in table and "test loss" in table and "exact match" in table
        assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000040"
        assert config_from_toml(tmp_path / "run.toml").MAX_STEPS == 40 and config_from_toml(tmp_path / "run.toml").LORA_R == 8
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(
            ["checkpoints", PANEL_NOTEBOOK, "run.toml", *[path.name for path in shots.values()]])  # no stray export
        assert all(path.stat().st_size > 10_000 for path in shots.values())
        artifacts = os.environ.get("JORA_TEST_ARTIFACTS")
        if artifacts:
            for path in shots.values():
                shutil.copy(path, artifacts)
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)


def test_export_and_try_it_say_what_to_fix_on_an_invalid_form(workspace, tmp_path):
    ui = panels(demo_config(workspace), workspace / "raft.jsonl", tmp_path / "none")
    ui.training.fields["LORA_R"].value = "0"
    ui.export.adapter_path.value = str(tmp_path / "adapter")
    assert not ui.export.save_adapter()
    assert "Fix the training form first: lora r: must be at least 1" in ui.export.status.value
    try_it = ui.try_it  # needs only a model folder: the invalid form does not matter to it
    try_it.instruction.value, try_it.max_new_tokens.value = "Which capital?", 2
    assert list(try_it.generate()) == ["base model"] and not try_it.button.disabled
    ui.training.fields["LORA_R"].value = "16"
    ui.export.save_adapter()  # a valid form but no run yet
    assert "No checkpoint in" in ui.export.status.value and "none yet: train first" in ui.export.status.value and not (tmp_path / "adapter").exists()


def test_try_it_sends_the_training_prompt_in_alpaca_or_chat_form(workspace, tmp_path):
    import shutil
    from jora.testing import add_chat_template
    model = tmp_path / "chat-llama"
    shutil.copytree(workspace / "tiny-llama", model)
    ui = panels(demo_config(workspace)._replace(LLAMA2_HF_PATH=str(model)), workspace / "raft.jsonl", tmp_path / "none")
    try_it, record = ui.try_it, demo_raft_records(1)[0]
    try_it.instruction.value, try_it.context.value, try_it.max_new_tokens.value = record["instruction"], record["input"], 3
    assert list(try_it.generate()) == ["base model"], try_it.output.value
    try_it.chat.value = True
    assert try_it.generate() == {} and "has no chat template" in try_it.output.value
    add_chat_template(model)
    try_it.model = None  # the panel loads the tokenizer again
    assert list(try_it.generate()) == ["base model"], try_it.output.value


def test_progress_line_has_counts_times_and_memory():
    from jora.form import progress_text
    line = progress_text({"step": 12, "loss": 1.5, "lr": 1e-4, "tokens_per_second": 900.4}, 40, elapsed=3725,
                         seconds_per_step=7.5, compiled_bytes=5 * 2**20)
    assert "step 12/40" in line and "900 tokens/s" in line and "elapsed 1:02:05" in line and "ETA 3:30" in line
    assert "memory per device (compiled step) 5.0 MiB" in line
    gpus = [{"device": "cuda:0", "bytes_in_use": 2**30}, {"device": "cuda:1", "bytes_in_use": 2**31}]
    assert "cuda:0 1.00 GiB, cuda:1 2.00 GiB" in progress_text({"step": 1, "loss": 1, "lr": 1, "tokens_per_second": 1},
                                                               2, 1, 1, None, gpus)


def test_a_start_into_a_finished_run_says_so_and_shows_its_history(workspace, tmp_path):
    ui = panels(demo_config(workspace, N_EPOCHS=1, EVAL_EVERY=0), workspace / "raft.jsonl", tmp_path / "run")
    training = ui.training
    training.fields["MAX_STEPS"].value = "3"
    assert training.start()
    training.wait(600)
    assert training.error is None and "finished at step 3" in training.status.value, training.log.value
    first_log = training.log.value
    assert training.start()  # the same folder again: resumed at step 3 of 3
    training.wait(600)
    assert "already finished at step 3 of 3: nothing was trained" in training.status.value
    assert "raise max steps above 3" in training.status.value
    assert [r["step"] for r in training.history] == [1, 2, 3] and training.plot.value[:4] == b"\x89PNG"
    assert training.log.value.count("train split:") == 1 and "resuming from" in training.log.value  # a new log
    assert first_log.count("train split:") == 1
    training.fields["MAX_STEPS"].value = "5"  # train on: two more steps after the three
    assert training.start()
    training.wait(600)
    assert [r["step"] for r in training.history] == [1, 2, 3, 4, 5] and "finished at step 5" in training.status.value
    assert "ETA" not in training.status.value  # the end line replaced the progress line


def test_try_it_needs_only_a_model_folder_and_samples_on_request(workspace, tmp_path):
    ui = panels(ParallamaConfig(), "", "")  # an empty training form
    try_it = ui.try_it
    try_it.instruction.value, try_it.max_new_tokens.value = "Which capital?", 4
    assert try_it.generate() == {} and "model folder: (empty) is not a Hugging Face model folder" in try_it.output.value
    try_it.model_folder.value = str(workspace / "tiny-llama")
    greedy = try_it.generate()["base model"]
    assert greedy == try_it.generate()["base model"]  # greedy repeats itself
    try_it.temperature.value, try_it.top_p.value = 1.5, 0.9
    assert isinstance(try_it.generate()["base model"], str)
    try_it.adapter.value = str(tmp_path / "no-adapter-here")
    assert try_it.generate() == {} and "no-adapter-here" in try_it.output.value


def test_settings_save_as_the_toml_jora_train_reads_and_load_back(tmp_path):
    from jora.cli import config_from_arguments, train_argument_parser
    form = panels(ParallamaConfig(LORA_R=8, LORA_TARGETS=("q_proj", "o_proj"), MAX_STEPS=7, MESH_MODEL=None), "", "")
    training = form.training
    assert not training.save_settings() and "give a file name" in training.settings_status.value
    training.fields["LORA_R"].value = "0"
    training.settings_path.value = str(tmp_path / "run.toml")
    assert not training.save_settings() and "fix the form first: lora r: must be at least 1" in training.settings_status.value
    assert not (tmp_path / "run.toml").exists()  # nothing written from an invalid form
    training.fields["LORA_R"].value = "8"
    assert training.save_settings() and "jora train --config" in training.settings_status.value
    saved = training.config()[0]
    arguments = train_argument_parser().parse_args(["--data", "d.jsonl", "--checkpoint-path", "c",
                                                    "--config", str(tmp_path / "run.toml")])
    assert config_from_arguments(arguments) == saved  # the command line reads what the panel wrote
    assert not training.save_settings() and "exists; choose a new name" in training.settings_status.value
    other = panels(ParallamaConfig(), "", "").training
    other.settings_path.value = str(tmp_path / "run.toml")
    assert other.load_settings() and other.config()[0] == saved
    (tmp_path / "bad.toml").write_text("LORA_R = 'eight'\n")
    other.settings_path.value = str(tmp_path / "bad.toml")
    assert not other.load_settings() and "bad.toml" in other.settings_status.value and "LORA_R" in other.settings_status.value


def test_each_field_shows_its_own_error_whatever_the_others_hold(workspace):
    training = panels(demo_config(workspace), workspace / "raft.jsonl", workspace / "never").training
    training.fields["MAX_STEPS"].value = "ten"      # unreadable: it once hid every other error and the preview
    training.fields["LORA_R"].value = "0"           # readable but out of range
    training.fields["MESH_DATA"].value = "16"       # a mesh bigger than the devices
    shown = {name: message.value for name, message in training.errors.items() if "b00020" in message.value}
    assert set(shown) == {"MAX_STEPS", "LORA_R", "MESH_DATA"}, shown
    assert "takes a whole number (or none), not &#x27;ten&#x27;" in shown["MAX_STEPS"]  # by the label, not int()'s text
    assert "MAX_STEPS" not in shown["MAX_STEPS"] and "invalid literal" not in shown["MAX_STEPS"]
    assert "mesh data x mesh seq x mesh model = 16 devices" in shown["MESH_DATA"]
    assert training.form.titles == ("Model", "Data", "LoRA \u26a0 1", "Optimisation \u26a0 1", "Devices \u26a0 1")
    assert training.command.value.startswith("<b>No command yet:</b> fix 3 fields first")
    assert "lora r (LoRA), max steps (Optimisation), mesh data (Devices)" in training.command.value
    assert "jora train" not in training.command.value and training.start_button.disabled
    training.fields["MAX_STEPS"].value, training.fields["LORA_R"].value, training.fields["MESH_DATA"].value = "4", "8", "1"
    assert training.form.titles == ("Model", "Data", "LoRA", "Optimisation", "Devices")
    assert "--max-steps 4" in training.command.value and "--lora-r 8" in training.command.value
    assert not training.start_button.disabled


def test_a_checkpoint_folder_of_other_files_is_refused_and_a_run_folder_is_resumed(workspace, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    training = panels(demo_config(workspace, MAX_STEPS=2), workspace / "raft.jsonl", tmp_path / "mine").training
    assert "already holds files jora did not write (thesis.tex)" in training.errors["checkpoint_path"].value
    assert training.start_button.disabled and not training.start()
    training.checkpoint_path.value = str(workspace / "tiny-llama")   # the model folder itself
    assert "b00020" in training.errors["checkpoint_path"].value and training.start_button.disabled
    training.checkpoint_path.value = str(tmp_path / "run")
    assert "a new folder" in training.errors["checkpoint_path"].value
    assert training.start()
    training.wait(600)
    assert training.error is None, training.log.value
    assert "holds a run up to step 2: Start resumes it" in training.errors["checkpoint_path"].value
    assert sorted(path.name for path in (tmp_path / "mine").iterdir()) == ["thesis.tex"]


def test_data_preview_shows_the_tokenized_examples_and_the_reports(workspace):
    training = panels(demo_config(workspace, MAX_SEQ_LEN=72), workspace / "raft.jsonl", "").training
    rows = training.preview_data(2)   # the checkpoint folder is not needed for a preview
    assert len(rows) == 2 and all(row["tokens"] <= 72 for row in rows)
    assert "train split:</b> 77 records" in training.preview.value and "test split:</b> 19 records" in training.preview.value
    assert "with the context truncated" in training.preview.value
    prompt, answer = rows[0]["text"][0], rows[0]["text"][-1]
    assert not prompt[1] and answer[1] and answer[0].endswith("</s>") and "background:#c8e6c9" in training.preview.value
    from jora.data import generate_alpaca_dataset
    first = generate_alpaca_dataset(workspace / "raft.jsonl", "train", training.config()[0])[0]  # what the run trains on
    assert rows[0]["tokens"] == len(first["input_ids"]) and rows[0]["answer tokens"] == int((first["labels"] >= 0).sum())
    training.data_path.value = str(workspace / "absent.jsonl")
    assert training.preview_data() == [] and "The preview needs: data file" in training.preview.value


def test_export_names_the_checkpoint_it_read_and_refuses_an_empty_path(workspace, tmp_path):
    ui = panels(demo_config(workspace, MAX_STEPS=2), workspace / "raft.jsonl", tmp_path / "run")
    assert ui.training.start()
    ui.training.wait(600)
    export = ui.export
    assert not export.save_adapter() and "No folder given for the PEFT adapter" in export.status.value
    assert not export.merge() and "No folder given for the merged model" in export.status.value
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]   # nothing written into the working folder
    export.adapter_path.value = str(tmp_path / "adapter")
    assert export.save_adapter() and "PEFT adapter of step 2" in export.status.value
    assert f"written to {tmp_path / 'adapter'}" in export.status.value
    assert not export.save_adapter() and "earlier jora PEFT adapter" in export.status.value  # needs "replace"
    export.overwrite.value = True
    assert export.save_adapter()


def test_evaluation_panel_says_what_to_fix(workspace, tmp_path):
    ui = panels(demo_config(workspace), workspace / "raft.jsonl", tmp_path / "no-run")
    evaluation = ui.evaluation
    assert not evaluation.start() and "adapter:" in evaluation.output.value and "does not exist" in evaluation.output.value
    evaluation.adapter.value, evaluation.max_examples.value = str(tmp_path), "some"
    assert not evaluation.start() and "test examples: give a whole number" in evaluation.output.value
    ui.training.fields["LORA_R"].value = "0"
    assert not evaluation.start() and "Fix the training form first: lora r" in evaluation.output.value


def test_evaluation_panel_measures_robustness_to_retrieval_noise(workspace, tmp_path):
    records = demo_raft_records(96)
    table_ids = {record["input"]: f"table-{number}" for number, record in enumerate(records)}
    (tmp_path / "tables.jsonl").write_text("\n".join(json.dumps({"id": name, "text": text}) for text, name in table_ids.items()))
    (tmp_path / "questions.jsonl").write_text("\n".join(json.dumps(
        {"question": r["instruction"], "answer": r["output"], "oracle_id": table_ids[r["input"]]}) for r in records[-3:]))
    ui = panels(demo_config(workspace, MAX_STEPS=2, MAX_SEQ_LEN=384), workspace / "raft.jsonl", tmp_path / "run")
    assert ui.training.start()
    ui.training.wait(600)
    evaluation = ui.evaluation
    evaluation.corpus.value = str(tmp_path / "tables.jsonl")
    assert not evaluation.start() and "corpus and questions go together" in evaluation.output.value
    evaluation.questions.value, evaluation.distractors.value, evaluation.max_new_tokens.value = \
        str(tmp_path / "questions.jsonl"), 2, 2
    assert evaluation.start()
    evaluation.wait(600)
    assert evaluation.error is None, evaluation.output.value
    assert len(evaluation.rows) == 2 * 9 and {row["model"] for row in evaluation.rows} == {"base model", "with adapter (step 2)"}
    assert "data:image/png;base64," in evaluation.output.value and "distractors shown" in evaluation.output.value
