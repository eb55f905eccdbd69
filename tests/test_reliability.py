"""Tests of the reliability guarantees of docs/reliability.md that are not a single module's: a user's
files in a run folder, what "finished" means, the fingerprints caches and --resume key on, and bad
input refused at the door in one line. Runs use test_train.py's tiny model and tasks (a second each)."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from ivft import checkpoint as ckpt
from ivft.load import read_safetensors
from test_train import Interrupt, base_args, env, expect_exit, run_main, tree_digest  # noqa: F401 (env: fixture)


def error_after_start(argv, capsys, callback=None) -> str:
    """Exit status 2 after work has begun: progress bars come first, the one error line last."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(argv, callback)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and [line for line in err if line.startswith("error: ")] == err[-1:], err[-3:]
    return err[-1]


# ---- item 7: a run without a general suite ends with its summary, not a TypeError -----------------

@pytest.mark.parametrize("spec", ["none", "", ",", "NONE"])
def test_a_run_without_a_general_suite_ends_cleanly(env, tmp_path, capsys, spec):
    out = tmp_path / "nogen"
    res = run_main([*base_args(env, out, "--eval_n", "2", "--eval_k_shot", "0"), "--general", spec])
    assert res["cl"]["GP"] == [None, None, None]
    assert "general suite: none" in (out / "log.txt").read_text()


# ---- item 1: a user's files are never touched ----------------------------------------------------

def snapshot(path: Path) -> dict:
    """Every name under path (folders too) with its content's digest: what must not change."""
    return {str(p.relative_to(path)): ("dir" if p.is_dir() else p.read_bytes()) for p in sorted(path.rglob("*"))}


def plant_user_files(folder: Path) -> list[str]:
    """A user's own files with every leftover-like name, plus names of this code's own form (a dead
    writer's, as a clean-up would take them) that are in a folder which is not a run's."""
    from test_files import USER_NAMES
    names = [*USER_NAMES, ".last.old-999999999-Sdeadbeef", ".log.txt.tmp-999999999-Sdeadbeef-abc12345"]
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        if name.startswith((".last.", ".stage-")):
            (folder / name).mkdir()
            (folder / name / "draft.txt").write_text(f"user folder {i}")
        else:
            (folder / name).write_text(f"user file {i}")
    return names


def test_user_files_with_leftover_like_names_are_never_touched(env, tmp_path, capsys):
    # the issue's example, and every other leftover-like name, in a folder that is not a run's
    user = tmp_path / "v"
    plant_user_files(user)
    before = snapshot(user)
    for extra in ([], ["--overwrite"], ["--resume"]):
        msg = expect_exit(base_args(env, user, *extra), capsys)
        assert "not a run's (.a.tmp-1-SDEADBEEF-x, " in msg and "9 more" in msg, msg
        assert snapshot(user) == before
    # the same names inside a run's own folder: still someone else's, refused, nothing touched
    run = tmp_path / "run"
    run_main(base_args(env, run))
    for name in ("summary.png", "stage-2"):      # a finished run's folder as a user might tidy it
        shutil.rmtree(run / name, ignore_errors=True)
    (run / ".report.tmp-final").write_text("draft")
    (run / ".settings.old-2023").write_text("settings")
    (run / ".last.old-2023").mkdir()
    before = snapshot(run)
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert ".last.old-2023" in expect_exit(base_args(env, run, *extra), capsys)
        assert snapshot(run) == before


# ---- items 2 and 5: a finished run is final ---------------------------------------------------------

def test_a_finished_run_is_never_wiped_by_a_plain_rerun(env, tmp_path, capsys):
    # finished without summary.png (--eval_n 0, --general none), its checkpoints removed by the user:
    # results.json says it trained, so it is no early death, and a rerun with other tasks is refused
    out = tmp_path / "done"
    run_main(base_args(env, out))
    for p in out.glob("stage-*"):
        shutil.rmtree(p)
    before = snapshot(out)
    one_task = [a if a != env["tasks"] else env["tasks"].split(",")[0] for a in base_args(env, out)]
    assert "already holds a run" in expect_exit(one_task, capsys)
    assert snapshot(out) == before
    # with the marker (train.py's last write): --resume is "finished", nothing changed, no checkpoint needed
    ckpt.mark_finished(out, ["a", "b"])
    before = snapshot(out)
    capsys.readouterr()
    res = run_main(base_args(env, out, "--resume"))
    assert "this run is finished" in capsys.readouterr().err and snapshot(out) == before
    assert res == json.loads((out / "results.json").read_text())
    assert "already holds a run" in expect_exit(one_task, capsys) and snapshot(out) == before


def test_overwrite_needs_a_folder_proven_to_be_a_runs(env, tmp_path, capsys):
    # names a run writes, but no train_config.json of a run: not proof, --overwrite deletes nothing
    out = tmp_path / "lookalike"
    (out / "stage-1").mkdir(parents=True)
    (out / "stage-1" / "model.safetensors").write_bytes(b"someone's weights")
    (out / "results.json").write_text('{"mine": 1}')
    before = snapshot(out)
    for extra in (["--overwrite"], ["--resume"], []):
        assert "not a run's" in expect_exit(base_args(env, out, *extra), capsys)
        assert snapshot(out) == before


def test_the_marker_is_removed_first_by_overwrite_and_read_back(tmp_path):
    assert ckpt.read_finished(tmp_path) is None
    ckpt.mark_finished(tmp_path, ["a"])
    assert ckpt.read_finished(tmp_path) == {"finished": True, "tasks": ["a"]}
    assert [p.name for p in tmp_path.iterdir()] == ["finished"]           # written atomically
    (tmp_path / "finished").write_text("[1]")                               # not a marker this code writes
    assert ckpt.read_finished(tmp_path) is None
    assert ckpt.is_run_file("finished") and ckpt.is_run_file(".finished.tmp-1-Sdeadbeef-x")


def test_results_without_the_last_tasks_training_entry_is_not_finished(env, tmp_path, capsys):
    # a kill between the last stage checkpoint and the final results.json write leaves the last
    # task's training entry out: --resume completes the run instead of calling it finished
    out = tmp_path / "cut"
    ref = run_main(base_args(env, out))
    res = json.loads((out / "results.json").read_text())
    assert len(res["training"]) == 2
    res["training"] = res["training"][:1]
    (out / "results.json").write_text(json.dumps(res))
    (out / "finished").unlink(missing_ok=True)         # (the marker, once train.py writes it, comes later)
    capsys.readouterr()
    again = run_main(base_args(env, out, "--resume"))
    assert "finished" not in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["training"] == ref["training"] == again["training"]


# ---- item 3: caches are keyed by the whole task content ---------------------------------------------

def test_task_fingerprint_covers_every_field_the_demonstrations_and_the_metric():
    from dataclasses import replace
    from ivft.ivfile import task_fingerprint
    from ivft.tasks import Example, Task
    ex = Example("Say it.", "cat", "CAT", choices=["CAT", "DOG"], knowledge_prompt="A cat is", knowledge_answer=" a pet")
    task = Task("t", "general", "choice", [ex], [replace(ex, input="dog", output="DOG")], "desc", demos=[ex])
    base = task_fingerprint(task)
    assert task_fingerprint(replace(task, name="u", kind="train", description="other")) == base   # labels only
    changed = {f: replace(ex, **{f: v}) for f, v in [("instruction", "Shout it."), ("input", "cow"),
               ("output", "COW"), ("choices", ["CAT", "COW"]), ("knowledge_prompt", "A dog is"),
               ("knowledge_answer", " wild")]}
    for field, other in changed.items():
        assert task_fingerprint(replace(task, train=[other])) != base, field
        assert task_fingerprint(replace(task, demos=[other])) != base, f"demos: {field}"
    assert task_fingerprint(replace(task, metric="exact_match")) != base
    assert task_fingerprint(replace(task, demos=[])) != base
    assert task_fingerprint(replace(task, train=task.test, test=task.train)) != base     # the split


def test_stage0_cache_is_not_reused_after_a_knowledge_answer_changes(env, tmp_path, monkeypatch):
    import evaluate
    gdir = tmp_path / "gk"
    gdir.mkdir()
    rows = [{"instruction": "Name the first letter.", "input": w, "output": w[0], "choices": [w[0], "z"],
             "knowledge_prompt": f"The word {w} starts with", "knowledge_answer": f" {w[0]}"}
            for w in ["cat", "dog", "sun", "red", "box", "hat"]]
    def write(rows):
        (gdir / "g.train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n")
        (gdir / "g.test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[3:]) + "\n")
    write(rows)
    cache = tmp_path / "stage0.json"
    ev = ["--eval_n", "3", "--eval_k_shot", "0", "--stage0_cache", str(cache), "--general", str(gdir / "g.train.jsonl")]
    run_main([*base_args(env, tmp_path / "r1"), *ev])
    write([{**r, "knowledge_answer": " a long and unlikely continuation"} for r in rows])
    calls = []
    real = evaluate.evaluate_suite
    monkeypatch.setattr(evaluate, "evaluate_suite", lambda *a, **k: calls.append(k["model_name"]) or real(*a, **k))
    second = run_main([*base_args(env, tmp_path / "r2"), *ev])
    assert calls and calls[0].startswith("stage 0"), "a stage-0 report of other knowledge answers was reused"
    first = json.loads((tmp_path / "r1" / "results.json").read_text())
    assert second["stages"][0]["tasks"]["g"]["knowledge_logprob"] != first["stages"][0]["tasks"]["g"]["knowledge_logprob"]


# ---- item 4: --resume checks the task data and the base weights ------------------------------------

def test_resume_refuses_changed_task_data_or_base_weights(env, tmp_path, capsys):
    from ivft.load import load_model
    from ivft.tasks import load_task
    from test_train import tiny_model, write_task
    model, tok = load_model(env["model"])
    folder = tmp_path / "data"
    folder.mkdir()
    tasks = [load_task(write_task(folder, "a", str.upper, 1))]
    general = [load_task(env["general"])]
    inputs = ckpt.input_fingerprints(tasks, general, model)
    run = ckpt.RunFiles(tmp_path / "run", {"preset": "plain"}, inputs=inputs)
    ckpt.save_checkpoint(tmp_path / "run" / "last", model, tok, run, {"stage_done": 0, "step": 1})
    last = tmp_path / "run" / "last"
    ckpt.check_resume_inputs(last, inputs)                         # the same data and model: resumes
    edited = [load_task(write_task(folder, "a", str.lower, 1))]     # same name and path, other answers
    with pytest.raises(ckpt.TrainError, match=r"^--resume: the data of training task 'a' changed since .*last"):
        ckpt.check_resume_inputs(last, ckpt.input_fingerprints(edited, general, model))
    other = tiny_model(seed=1)                                       # other weights at the same path
    with pytest.raises(ckpt.TrainError, match=r"^--resume: the base model's weights changed"):
        ckpt.check_resume_inputs(last, ckpt.input_fingerprints(tasks, general, other))
    (last / ckpt.INPUTS_FILE).unlink()                               # a checkpoint of older code: a warning
    capsys.readouterr()
    ckpt.check_resume_inputs(last, inputs)
    assert "records no fingerprints" in capsys.readouterr().err


# ---- items 6 and 8: flags checked at the door -----------------------------------------------------

@pytest.mark.parametrize("flag,value,what", [
    ("--lora_alpha", "0", "--lora_alpha 0.0: must be > 0"), ("--lora_alpha", "-4", "--lora_alpha -4.0: must be > 0"),
    ("--betas", "nan,nan", "--betas nan,nan: expected two numbers in [0, 1)"),
    ("--betas", "1.5,0.9", "--betas 1.5,0.9"), ("--betas", "0.9,inf", "--betas 0.9,inf"),
    ("--betas", "0.9", "--betas 0.9:"), ("--betas", "a,b", "--betas a,b"), ("--betas", "-0.1,0.9", "--betas -0.1,0.9"),
    ("--max_len", "1000000", "--max_len 1000000: must be <= 131072"),
])
def test_flags_out_of_range_are_one_line(env, tmp_path, capsys, flag, value, what):
    out = tmp_path / "run"
    msg = expect_exit([*base_args(env, out), f"{flag}={value}", "--lora_r", "4"], capsys)
    assert msg == f"error: {what}" or msg.startswith(f"error: {what}"), msg
    assert not out.exists()


def test_a_task_in_both_tasks_and_general_is_refused(env, tmp_path, capsys):
    out = tmp_path / "run"
    first = env["tasks"].split(",")[0]
    msg = expect_exit([*base_args(env, out), "--general", f"{env['general']},{first}"], capsys)
    assert first in msg and "in both --tasks and --general" in msg and not out.exists()
    # loaded: the same name, or the same content under another name
    from ivft.tasks import TaskError, check_never_trained_on, load_task
    a, g = load_task(first), load_task(env["general"])
    check_never_trained_on([a], [g])
    copy = tmp_path / "renamed.train.jsonl"
    shutil.copy(first, copy)
    shutil.copy(first.replace(".train.", ".test."), tmp_path / "renamed.test.jsonl")
    with pytest.raises(TaskError, match="task 'renamed' is in the general suite and trained on \\(as 'a'\\)"):
        check_never_trained_on([a], [g, load_task(str(copy))])


# ---- item 8: a model folder that cannot be loaded is one line naming the file and field ---------------

def model_copy(env, tmp_path, name="m") -> Path:
    dst = tmp_path / name
    shutil.copytree(env["model"], dst)
    return dst


@pytest.mark.parametrize("change,what", [
    ({"hidden_size": -32}, "config field 'hidden_size' is -32; expected a whole number in [1, 65536]"),
    ({"hidden_size": "32"}, "config field 'hidden_size' is '32'"),
    ({"hidden_size": None}, "config field 'hidden_size' is None"),
    ({"num_hidden_layers": 10_000_000}, "config field 'num_hidden_layers' is 10000000"),
    ({"vocab_size": 2.5}, "config field 'vocab_size' is 2.5"),
    ({"max_position_embeddings": 0}, "config field 'max_position_embeddings' is 0"),
    ({"rms_norm_eps": -1}, "config field 'rms_norm_eps' is -1; expected a finite number > 0"),
    ({"rope_theta": "big"}, "config field 'rope_theta' is 'big'"),
    ({"num_attention_heads": 64, "head_dim": None}, "head_dim 0"),
    ("list", "expected a JSON object of model settings, got list"),
])
def test_bad_config_json_is_one_line_naming_the_field(env, tmp_path, capsys, change, what):
    from ivft.load import LoadError, load_model
    m = model_copy(env, tmp_path)
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps([cfg] if change == "list" else {**cfg, **change}))
    with pytest.raises(LoadError) as e:
        load_model(m)
    assert str(e.value).startswith(f"{m / 'config.json'}: ") and what in str(e.value), str(e.value)
    out = tmp_path / "run"                          # and train.py: one line, exit 2, nothing created
    args = base_args(env, out)
    args[args.index("--model") + 1] = str(m)
    assert what in expect_exit(args, capsys) and not out.exists()


@pytest.mark.parametrize("content", ['{"model": 5}', "[1]", '{"model": {"type": "BPE", "vocab": [], "merges": 3}}',
                                     "\xff not json"])
def test_bad_tokenizer_json_is_one_line(env, tmp_path, content):
    from ivft.load import LoadError, load_model
    m = model_copy(env, tmp_path)
    (m / "tokenizer.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(LoadError, match=f"^not a usable tokenizer: .*{m / 'tokenizer.json'}"):
        load_model(m)


def test_shards_outside_the_model_folder_are_refused(env, tmp_path):
    from ivft.load import LoadError, load_model
    m = model_copy(env, tmp_path)
    other = model_copy(env, tmp_path, "other")
    (m / "model.safetensors").unlink()
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../other/model.safetensors"}}))
    with pytest.raises(LoadError, match="shard '../other/model.safetensors' is not a file name in"):
        load_model(m)
    assert (other / "model.safetensors").is_file()


def test_sequence_length_is_checked_against_the_models_context(env, tmp_path):
    from ivft.load import LoadError, check_context, read_config_only, read_hf_config
    m = model_copy(env, tmp_path)
    (m / "model.safetensors").write_bytes(b"not read: only the config is")
    mc = read_hf_config(m)
    assert read_config_only(m) == mc
    check_context(512, mc)
    with pytest.raises(LoadError, match=r"^--max_len 513: longer than the model's context \(max_position_embeddings 512\)"):
        check_context(513, mc)


# ---- item 8: damaged training states and results on --resume -------------------------------------------

def interrupted_run(env, out):
    def ctrl_c(stage, step, model):
        if (stage, step) == (1, 2):
            raise KeyboardInterrupt
    with pytest.raises(SystemExit):
        run_main(base_args(env, out), ctrl_c)
    return out


@pytest.mark.parametrize("damage,what", [
    (lambda st: st.pop("stage_done"), "field 'stage_done' is missing"),
    (lambda st: st.pop("rng"), "field 'rng' is missing"),
    (lambda st: st.update(step="2"), "field 'step' is not a whole number"),
    (lambda st: st.pop("optimizer"), "without its optimizer state"),
    (lambda st: st.update(stage_done=7), "records 7 task(s) done (step 2) of a run of 2"),
])
def test_a_damaged_training_state_is_one_line(env, tmp_path, capsys, damage, what):
    out = interrupted_run(env, tmp_path / "cut")
    shutil.rmtree(out / "stage-1")                         # `last` is the only checkpoint
    state = torch.load(out / "last" / "train_state.pt", weights_only=True)
    damage(state)
    torch.save(state, out / "last" / "train_state.pt")
    before = snapshot(out)
    msg = expect_exit(base_args(env, out, "--resume"), capsys)
    assert what in msg and str(out / "last") in msg, msg
    assert snapshot(out) == before


def test_a_corrupt_results_json_on_resume_is_one_line(env, tmp_path, capsys):
    out = tmp_path / "done"
    run_main(base_args(env, out))
    ckpt.mark_finished(out, ["a", "b"])
    for text in ("{", "[1, 2]", '"x"'):
        (out / "results.json").write_text(text)
        before = snapshot(out)
        msg = expect_exit(base_args(env, out, "--resume"), capsys)
        assert msg.startswith(f"error: {out / 'results.json'}: ") and snapshot(out) == before, msg


def test_a_tokenizer_without_a_chat_template_gets_the_plain_format_and_one_note(env, tmp_path, capsys):
    m = model_copy(env, tmp_path)
    text = (m / "tokenizer.json").read_text()      # its turn tokens renamed: no template is recognisable
    (m / "tokenizer.json").write_text(text.replace("<|im_start|>", "<|turn|>").replace("<|im_end|>", "<|stop|>"))
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (m / name).unlink(missing_ok=True)
    out = tmp_path / "run"
    args = base_args(env, out)
    args[args.index("--model") + 1] = str(m)
    capsys.readouterr()
    run_main(args)                                  # a base model: trained in the plain Q:/A: format
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "no chat template" in notes[0], notes
    assert (out / "finished").is_file()


# ---- items 8 and 9: a full disk under the IV cache ---------------------------------------------------

@pytest.mark.parametrize("error", ["oserror", "safetensors"])
def test_a_full_disk_under_the_iv_cache_is_one_line_naming_the_file(env, tmp_path, capsys, monkeypatch, error):
    import errno
    from safetensors import SafetensorError
    from ivft import ivfile

    def full(path, data):
        if error == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))      # no file name, as a full disk gives
        raise SafetensorError("Error while serializing: IoError(No space left on device)")
    monkeypatch.setattr(ivfile, "write_atomic", full)
    out = tmp_path / "run"
    msg = error_after_start([*base_args(env, out), "--guided", "--iv_dir", str(tmp_path / "ivs"),
                             "--iv_n_clean", "4", "--iv_n_corrupt", "4", "--iv_top_k", "2"], capsys)
    assert f"error: IV of task 'a': {tmp_path / 'ivs'}" in msg and ".safetensors: cannot write (" in msg, msg
    assert "No space left on device" in msg and not out.exists()


# ---- item 9: leftovers, folders and names ---------------------------------------------------------------

def test_out_dir_removed_under_a_running_train_stops_it_before_it_writes(env, tmp_path, capsys):
    out = tmp_path / "gone"

    def remove(stage, step, model):
        if (stage, step) == (0, 1):
            shutil.rmtree(out)            # the lock goes with it: a second writer could start here now
            out.mkdir()                   # (and, say, that second writer's folder appears)
            (out / "theirs.txt").write_text("another run")
    msg = error_after_start(base_args(env, out, "--save_every", "2"), capsys, callback=remove)
    assert "run.lock is gone or another process's" in msg, msg
    # no checkpoint written there (the log line of the step before the save is: runtime.Logger appends)
    assert not (out / "last").exists() and (out / "theirs.txt").read_text() == "another run"


def test_stage0_cache_inside_out_dir_is_refused(env, tmp_path, capsys):
    out = tmp_path / "run"
    msg = expect_exit(base_args(env, out, "--eval_n", "2", "--stage0_cache", str(out / "s0.json")), capsys)
    assert "--stage0_cache" in msg and "must be outside --out_dir" in msg and not out.exists()


def test_a_wandb_folder_belongs_to_a_run_that_logs_to_wandb(tmp_path):
    from types import SimpleNamespace
    out = tmp_path / "run"
    (out / "wandb").mkdir(parents=True)
    settings = {"preset": "plain", "tasks": "a", "out_dir": str(out), "wandb": True}
    (out / "train_config.json").write_text(json.dumps(settings))
    d = SimpleNamespace(world=1, main=True, rank=0)
    ckpt.find_resume(ckpt.RunFiles(out, settings), 1, True, False, True, d)       # resumable
    with pytest.raises(ckpt.TrainError, match=r"not a run's \(wandb\)"):          # not without --wandb
        ckpt.find_resume(ckpt.RunFiles(out, {**settings, "wandb": False}), 1, True, False, True, d)


def test_model_dot_and_dot_dot_get_their_folders_name_as_iv_tag(tmp_path, monkeypatch):
    from ivft.ivfile import model_tag
    (tmp_path / "MyModel" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "MyModel" / "sub")
    assert model_tag(".") == "sub" and model_tag("..") == "MyModel" and model_tag("../") == "MyModel"
    assert model_tag("/x/m.gguf") == "m" and model_tag("runs/plain/stage-2") == "stage-2"


def test_an_iv_write_killed_midway_is_cleaned_by_the_next_write(tmp_path):
    import extract_iv as X
    from ivft.ivfile import save_iv
    from toys import SMALL, TOK, char_model, standin_task
    a = X.extract_iv(char_model(), TOK, standin_task(), progress=False, **SMALL)
    dead = tmp_path / ".opp.safetensors.tmp-999999999-Sdeadbeef-k1x2"     # a SIGKILLed writer's
    dead.write_bytes(b"half")
    mine = [tmp_path / ".opp.safetensors.tmp-draft", tmp_path / ".notes.txt.tmp-999999999-Sdeadbeef-k1x2"]
    for p in mine:
        p.write_text("a user's")
    save_iv(a, tmp_path / "opp.safetensors")
    assert not dead.exists() and all(p.read_text() == "a user's" for p in mine)


def test_base_weights_with_nan_are_refused_before_training(env, tmp_path, capsys):
    from ivft.load import read_safetensors
    from safetensors.torch import save_file
    m = model_copy(env, tmp_path)
    sd = dict(read_safetensors(m / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    sd[name] = sd[name].clone()
    sd[name][0, 0] = float("inf")
    save_file(sd, str(m / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "run"
    args = base_args(env, out)
    args[args.index("--model") + 1] = str(m)
    assert expect_exit(args, capsys) == f"error: {m}: tensor {name} holds NaN or Inf values" and not out.exists()


def test_characters_the_tokenizer_cannot_spell_are_named(smollm):
    from ivft.tasks import Example, Task, unspellable_note
    _, tok = smollm
    plain = Task("t", "train", "exact_match", [Example("Say it.", "cat", "CAT")], [Example("Say it.", "dog", "DOG")])
    assert unspellable_note(plain, tok) is None
    odd = Task("t", "train", "exact_match", [Example("Say it.", "c\x04t", "C\x06T")], [Example("Say it.", "dog", "DOG")])
    note = unspellable_note(odd, tok)
    assert note.startswith("warning: task 't': 2 character(s)") and "U+0004, U+0006" in note
    assert "\ufffd" in tok.decode(tok.encode("c\x04t"))          # what the note warns of


# ---- what train.py does once it calls the checks above (skipped until it does) --------------------------

TRAIN_PY = (Path(__file__).resolve().parents[1] / "train.py").read_text()
wired = pytest.mark.skipif(not all(f"ckpt.{f}(" in TRAIN_PY for f in ("mark_finished", "check_before_load",
                                                                       "check_after_load")),
                           reason="train.py does not call ckpt.mark_finished / check_before_load / "
                                  "check_after_load yet (issue 39: the lead wires them)")


@wired
def test_wired_a_run_killed_at_the_plot_is_completed_by_resume(env, tmp_path, capsys, monkeypatch):
    from ivft import runtime as report      # (the log's final lines call plot_summary through ivft.runtime)
    args = base_args(env, tmp_path / "cut", "--eval_n", "2", "--eval_k_shot", "0", "--general", env["general"])
    real = report.plot_summary

    def killed(*a, **k):
        raise KeyboardInterrupt             # a kill at the plot: results.json is written, the marker not
    monkeypatch.setattr(report, "plot_summary", killed)
    with pytest.raises(SystemExit):
        run_main(args)
    out = tmp_path / "cut"
    assert (out / "results.json").is_file() and ckpt.read_finished(out) is None
    monkeypatch.setattr(report, "plot_summary", real)
    capsys.readouterr()
    again = run_main([*args, "--resume"])
    assert "finished" not in capsys.readouterr().err and ckpt.read_finished(out) is not None
    ref = run_main([*base_args(env, tmp_path / "ref", "--eval_n", "2", "--eval_k_shot", "0",
                               "--general", env["general"])])
    assert again["metrics"] == ref["metrics"] and again["cl"] == ref["cl"]
    assert ckpt.read_finished(tmp_path / "ref") == {"finished": True, "tasks": ["a", "b"]}
    before = snapshot(out)
    run_main([*args, "--resume"])
    assert snapshot(out) == before


def cut_run_then_edit_its_data(env, tmp_path) -> tuple[list, Path]:
    """A run of its own two task files, cut by Ctrl-C in task 2, then task b's file rewritten at the
    same path with other answers -> (the run's flags, its out_dir)."""
    from test_train import write_task
    data = tmp_path / "data"
    data.mkdir()
    tasks = ",".join([write_task(data, "a", str.upper, 1), write_task(data, "b", lambda w: w[::-1], 2)])
    out = tmp_path / "run"
    args = [a if a != env["tasks"] else tasks for a in base_args(env, out)]

    def ctrl_c(stage, step, model):
        if (stage, step) == (1, 1):
            raise KeyboardInterrupt
    with pytest.raises(SystemExit):
        run_main(args, ctrl_c)
    write_task(data, "b", str.lower, 2)                     # the same path, other answers
    return args, out


@wired
def test_wired_resume_over_edited_task_data_is_one_line(env, tmp_path, capsys):
    args, out = cut_run_then_edit_its_data(env, tmp_path)
    before = snapshot(out)
    msg = expect_exit([*args, "--resume"], capsys)
    assert msg.startswith("error: --resume: the data of training task 'b' changed since") and snapshot(out) == before


@wired
def test_wired_context_and_suite_checks_come_before_the_model_loads(env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(ckpt, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert expect_exit(base_args(env, out, "--max_len", "600"), capsys) == \
        "error: --max_len 600: longer than the model's context (max_position_embeddings 512)"
    first = env["tasks"].split(",")[0]
    copy = tmp_path / "again.train.jsonl"
    shutil.copy(first, copy)
    shutil.copy(first.replace(".train.", ".test."), tmp_path / "again.test.jsonl")
    assert "task 'again' is in the general suite and trained on (as 'a')" in \
        expect_exit([*base_args(env, out), "--general", str(copy)], capsys)
    assert not out.exists()


def test_stage0_cache_key_holds_the_weights_and_config(env):
    import evaluate
    from ivft.load import load_model
    from ivft.tasks import load_task
    from test_train import tiny_model
    model, _ = load_model(env["model"])
    tasks, general = [load_task(p) for p in env["tasks"].split(",")], [load_task(env["general"])]
    ev = evaluate.StageEval(2, 0)
    key = evaluate.stage_cache_key(model, tasks, general, ev, torch.float32)
    assert evaluate.stage_cache_key(model, tasks, general, evaluate.StageEval(2, 0, batch_size=7), torch.float32) == key
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert evaluate.stage_cache_key(model, tasks, general, ev, torch.float32)["weights"] != key["weights"]
    wider = tiny_model(hidden=48)
    assert evaluate.stage_cache_key(wider, tasks, general, ev, torch.float32)["config"] != key["config"]


def test_absurd_sizes_from_any_source_are_refused_before_building():
    # GGUF metadata is not config.json: build_model checks the sizes of whatever config it gets
    from ivft.load import LoadError, build_model
    from test_train import tiny_model
    mc = tiny_model().config
    mc.num_hidden_layers = 10_000_000       # as a GGUF's metadata could say (its layer_types unchecked)
    with pytest.raises(LoadError, match=r"^x\.gguf: model size num_hidden_layers=10000000 is outside \[1, 1024\]"):
        build_model(mc, {}, "x.gguf")


def test_a_users_file_named_run_lock_is_neither_rewritten_nor_removed(env, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "run.lock").write_text("my notes about locks\n")
    for extra in ([], ["--overwrite"], ["--resume"]):
        msg = expect_exit(base_args(env, out, *extra), capsys)
        assert "run.lock exists and is not a run lock" in msg, msg
        assert (out / "run.lock").read_text() == "my notes about locks\n" and len(list(out.iterdir())) == 1


# ---- a Ctrl-C during the stage checkpoint write; --resume over changed inputs, when told ----------------

def test_ctrl_c_during_the_stage_checkpoint_write_keeps_the_task(env, tmp_path, monkeypatch):
    # the signal arrives while stage-1 is being written: the write completes, the run stops right
    # after it, and --resume continues with task 2 to the uninterrupted run's weights
    import os
    import signal
    real = ckpt.save_checkpoint

    def interrupted(path, *a, **k):
        if path.name == "stage-1":
            os.kill(os.getpid(), signal.SIGINT)         # Ctrl-C in the middle of the write
        return real(path, *a, **k)
    ref = tmp_path / "ref"
    run_main(base_args(env, ref))
    out = tmp_path / "cut"
    monkeypatch.setattr(ckpt, "save_checkpoint", interrupted)
    with pytest.raises(SystemExit) as e:
        run_main(base_args(env, out))
    assert e.value.code == 130 and ckpt.read_state(out / "stage-1")["stage_done"] == 1
    assert not (out / "stage-2").exists()
    monkeypatch.setattr(ckpt, "save_checkpoint", real)
    run_main(base_args(env, out, "--resume"))
    a, b = read_safetensors(ref / "stage-2" / "model.safetensors"), read_safetensors(out / "stage-2" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_over_changed_data_continues_when_told(env, tmp_path, capsys):
    args, _ = cut_run_then_edit_its_data(env, tmp_path)
    assert "--accept_changed_inputs" in expect_exit([*args, "--resume"], capsys)
    capsys.readouterr()
    res = run_main([*args, "--resume", "--accept_changed_inputs"])
    assert "the data of training task 'b' changed" in capsys.readouterr().err and len(res["training"]) == 2
