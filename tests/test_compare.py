"""experiments/compare.py: runs side by side from their results.json, one line of error for a folder
that is not a run."""
import json

import compare

CL = {"stages": 2, "train_tasks": ["A", "B"], "general_tasks": ["g"], "R": [[0.0, 0.1], [0.9, 0.2], [0.5, 0.8]],
      "AP": 0.65, "BWT": -0.4, "FWT": 0.2, "forgetting": {"A": 0.4, "B": None}, "GP": [0.5, 0.3, 0.2],
      "GP_drop": 0.3, "IP": [0.6, 0.5, 0.5], "IP_drop": 0.1}


def write_run(folder, cl):
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"config": {"preset": "plain"}, "stages": [{}] * 3, "cl": cl}))
    return folder


def test_table_of_two_runs(tmp_path, capsys):
    a = write_run(tmp_path / "plain", CL)
    b = write_run(tmp_path / "guided", {**CL, "GP": [0.5, 0.45, 0.4], "GP_drop": 0.1})
    assert compare.main([str(a), str(b), "--png", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["run", "new", "task"]
    # new task = mean of R[1][0] and R[2][1]; general before / after; GP drop; IP drop; AP; BWT; stages
    assert out[1].split()[1:] == ["0.850", "0.500", "0.200", "0.300", "0.100", "0.650", "-0.400", "2"]
    assert out[2].split()[1:5] == ["0.850", "0.500", "0.400", "0.100"]


def test_a_folder_without_results_is_one_line(tmp_path, capsys):
    assert compare.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "results.json: no such file" in err[0]
    (tmp_path / "results.json").write_bytes(b"\xff garbage")
    assert compare.main([str(tmp_path)]) == 2
    assert "not a results file" in capsys.readouterr().err


def test_a_results_json_that_is_not_a_runs_is_one_line(tmp_path, capsys):
    # a list, a string, a number, an object whose "cl" is not one, a damaged cl, deep nesting
    for i, text in enumerate(['[1, 2]', '"results"', '3', '{"cl": [1]}', '{"cl": {"R": 1, "stages": 1}}',
                              '{"stages": "x"}', "[" * 100000 + "]" * 100000]):
        folder = tmp_path / f"r{i}"
        folder.mkdir()
        (folder / "results.json").write_text(text)
        capsys.readouterr()
        assert compare.main([str(folder), "--png", str(tmp_path / "c.png")]) == 2, text[:20]
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"compare.py: error: {folder / 'results.json'}: not a results"), err
