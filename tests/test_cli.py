"""The `jora` console script, run as a user runs it."""
import shutil
import subprocess
import sys


def test_jora_demo_checks_against_transformers(tmp_path):
    executable = shutil.which("jora")
    command = [executable] if executable else [sys.executable, "-c", "import sys, jora.cli; sys.exit(jora.cli.main())"]
    result = subprocess.run([*command, "check", "--folder", str(tmp_path / "tiny"), "--max-new-tokens", "12"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "jora generated 12 tokens" in result.stdout
    assert "greedy tokens identical to transformers.generate: True" in result.stdout
    assert (tmp_path / "tiny" / "config.json").is_file() and (tmp_path / "tiny" / "tokenizer.json").is_file()


def test_jora_without_a_command_explains_usage():
    from jora.cli import main
    try:
        main([])
    except SystemExit as exit:
        assert exit.code == 2
    else:
        raise AssertionError("`jora` with no command should exit with a usage error")
