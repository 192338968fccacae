"""The run's page (session/card.py): the model card in each checkpoint's Hub commit, and
`status --html` for any store.

The Hub tests drive the real huggingface_hub client against the Hub double and read its commit
history; the browser test opens the page in headless Chromium when the `chromium` binary is
installed (Debian: `apt-get install chromium`). `.ci/run` installs it on the CI machine and sets
BATON_REQUIRE_CHROMIUM=1, so there the test runs (and fails without a browser); on a machine
without Chromium it is skipped, saying why, and the page's content is checked without one.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent_helpers import ROOT, agent_env, open_run, run_agent, write_config, write_data
from tests.store_helpers import make_checkpoint

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRE_CHROMIUM = os.environ.get("BATON_REQUIRE_CHROMIUM") == "1"  # set by .ci/run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("page-inputs")
    return {"model": tiny_model_dir, "data": write_data(folder / "train.jsonl")}


def repo_of(uri: str) -> str:
    return uri[len("hf://"):]


def history(hub_server, repo_id: str) -> list[dict[str, bytes]]:
    """The repo's content after each commit, oldest first (the double keeps every one)."""
    state = hub_server.state
    with state.lock:
        repo = state.repo(repo_id)
        return [{p: repo.blobs[e.lfs or e.oid] for p, e in c.files.items()}
                for c in repo.commits]


def changed(before: dict[str, bytes], after: dict[str, bytes]) -> set[str]:
    return {p for p in set(before) | set(after) if before.get(p) != after.get(p)}


# -- the commit carries the page --------------------------------------------------------------

def test_extra_files_ride_in_the_checkpoint_commit(hub_server, tmp_path):
    from baton.handoff import open_store
    from baton.handoff.checkpoint import commit_checkpoint
    from baton.handoff.runstore import RunStore

    uri = hub_server.new_repo_uri()
    rs = RunStore(open_store(uri), "t")
    card = tmp_path / "README.md"
    card.write_text("card at step 1")
    commit_checkpoint(rs, make_checkpoint(tmp_path / "c1", 1), step=1, generation=1,
                      extra={"README.md": card})
    assert hub_server.commits(repo_of(uri)) == 1
    files = hub_server.files(repo_of(uri))
    assert files["README.md"] == b"card at step 1"
    manifest = json.loads(files["t/checkpoints/00000001-g1/manifest.json"])
    assert "README.md" not in str(manifest), "the page is not part of the checkpoint"

    # The same checkpoint marked finished (HEAD alone moves): still one commit with the page.
    card.write_text("card, finished")
    commit_checkpoint(rs, make_checkpoint(tmp_path / "c1b", 1), step=1, generation=1,
                      finished=True, extra={"README.md": card})
    assert hub_server.commits(repo_of(uri)) == 2
    assert hub_server.files(repo_of(uri))["README.md"] == b"card, finished"
    assert rs.read_head()[0].finished


@pytest.mark.slow
def test_hub_run_commits_its_page_with_every_checkpoint(tiny, tmp_path, hub_server):
    uri = hub_server.new_repo_uri()
    config = write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"], store=uri)
    done = run_agent(config, workdir=tmp_path / "w")
    assert done.returncode == 0, done.stdout + done.stderr

    snapshots = history(hub_server, repo_of(uri))
    steps = [changed(a, b) for a, b in zip(snapshots, snapshots[1:])]
    with_card = [i for i, c in enumerate(steps) if "README.md" in c]
    checkpoints = [i for i, c in enumerate(steps)
                   if any(p.endswith("/manifest.json") for p in c)]
    assert len(checkpoints) >= 2, "a first checkpoint after step 1, and the final one"
    assert with_card == checkpoints, "one commit per checkpoint, the card in it, none extra"

    first = snapshots[checkpoints[0] + 1]["README.md"].decode()
    assert "running: a session is training now" in first and "| step | 1 of 6" in first
    assert "t/checkpoints/00000001-g1" in first
    final = hub_server.files(repo_of(uri))
    card = final["README.md"].decode()
    assert card.startswith("---\n") and "library_name: peft" in card
    assert "- baton\n" in card and "- qlora\n" in card
    assert "| state | finished |" in card and "| step | 6 of 6 (100.0%) |" in card
    assert "## Sessions" in card and "![loss curve of t](t/loss.png)" in card
    assert f'PeftModel.from_pretrained(base, "{repo_of(uri)}", subfolder="t/final")' in card
    assert final["t/loss.png"].startswith(b"\x89PNG")
    # Where each session's time went: a stacked bar a session, in the same commit.
    assert "![where each session's time went](t/time.png)" in card
    assert final["t/time.png"].startswith(b"\x89PNG") and "| goodput (training / wall" in card
    assert final["t/final/adapter_model.safetensors"] == \
        final[f"t/checkpoints/{open_run(uri).read_head()[0].checkpoint}/adapter_model.safetensors"]
    check_final_adapter_loads(uri, tiny["model"], tmp_path)


def check_final_adapter_loads(uri: str, model_dir: Path, tmp_path: Path) -> None:
    """The card's subfolder holds a PEFT adapter that loads (fetched by the Hub client)."""
    import os

    from huggingface_hub import snapshot_download
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    local = snapshot_download(repo_of(uri), allow_patterns=["t/final/*"],
                              local_dir=tmp_path / "dl", endpoint=os.environ["HF_ENDPOINT"],
                              token=os.environ["HF_TOKEN"])
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(base, str(Path(local) / "t" / "final"))
    assert any("lora_A" in name for name, _ in model.named_parameters())


# -- status --html ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_page(tiny, tmp_path_factory):
    """A local run trained to its end, and its `status --html` page."""
    tmp = tmp_path_factory.mktemp("local-page")
    store = tmp / "store"
    config = write_config(tmp, model_dir=tiny["model"], train_file=tiny["data"], store=str(store))
    done = run_agent(config, workdir=tmp / "w")
    assert done.returncode == 0, done.stdout + done.stderr
    page = tmp / "page" / "run.html"
    shown = subprocess.run([sys.executable, "agent.py", "status", "--store", str(store),
                            "--run", "t", "--html", str(page)], cwd=ROOT, env=agent_env(),
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "the run's page written to" in shown.stdout
    return {"store": store, "page": page, "tmp": tmp}


@pytest.mark.slow
def test_status_html_of_a_local_run_is_one_self_contained_page(local_page):
    text = local_page["page"].read_text()
    assert "<table>" in text and "<td>finished</td>" in text
    assert "<td>6 of 6 (100.0%)</td>" in text and "<h2>Sessions</h2>" in text
    assert text.count('src="data:image/png;base64,') == 2, "the loss plot and the time bars"
    assert "http://" not in text and "https://" not in text, "nothing fetched from elsewhere"
    adapter = local_page["store"] / "t" / "checkpoints" / "00000006-g1"
    assert f'"{adapter}"' in html.unescape(text), "the page loads the adapter from where it is"
    assert (adapter / "adapter_config.json").is_file()
    assert "library_name" not in text, "no YAML block on the HTML page"


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None and not REQUIRE_CHROMIUM, reason="chromium is not "
                    "installed (Debian: apt-get install chromium; .ci/run installs it in CI); "
                    "the page's content is checked by the test above")
def test_status_html_renders_table_and_plot_in_headless_chromium(local_page):
    """The screenshot holds the tables' borders and the plot's line (matplotlib's blue)."""
    assert CHROMIUM, "BATON_REQUIRE_CHROMIUM=1 but no chromium on PATH: .ci/run installs it"
    import numpy as np
    from matplotlib import image

    shot = local_page["tmp"] / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1100,1600",
                    local_page["page"].as_uri()], check=True, capture_output=True, timeout=120)
    pixels = (image.imread(shot)[..., :3] * 255).astype(int)
    blue = np.abs(pixels - [31, 119, 180]).sum(axis=-1) < 40
    border = np.abs(pixels - [204, 204, 204]).sum(axis=-1) < 12
    assert blue.sum() > 200, "the loss plot is drawn"
    assert border.sum() > 500, "the tables are drawn"
