"""``ckptavg publish``: push a model folder to a Hugging Face Hub repo, as one commit."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import click

from ckptavg.publishing.hub import HubTarget, folder_files, push_folder
from ckptavg.units import format_bytes

log = logging.getLogger("ckptavg.cli")


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--hub", "repo_id", required=True, metavar="NAMESPACE/NAME",
              help="Hub repo to push to; created if it does not exist.")
@click.option("--revision", metavar="BRANCH", help="Branch to commit to, created from main if missing. [default: main]")
@click.option("--private", is_flag=True, help="Create the repo private if it does not exist yet "
              "(an existing repo keeps its visibility).")
@click.option("-m", "--message", help="Commit message. [default: 'Upload FOLDER with ckptavg']")
@click.option("--endpoint", metavar="URL", help="Hub URL. [default: $HF_ENDPOINT, else https://huggingface.co]")
@click.option("--max-attempts", type=click.IntRange(1, 100), default=8, show_default=True,
              help="Tries on 429/5xx/network errors (exponential backoff, Retry-After honoured).")
@click.option("--skip-outside-links", is_flag=True,
              help="Leave out (with a warning) symlinks whose target is outside FOLDER instead of refusing.")
def publish(folder: Path, repo_id: str, revision: str | None, private: bool, message: str | None,
            endpoint: str | None, max_attempts: int, skip_outside_links: bool) -> None:
    """Push a model folder to the Hugging Face Hub in one commit.

    Every file of FOLDER is uploaded and every file the branch has but FOLDER
    lacks is deleted (.gitattributes is kept), all in a single commit: the
    branch mirrors the folder and nobody sees half a model. A symlink such as
    avg/best is resolved first. A symlink inside FOLDER whose target is outside it
    is refused (--skip-outside-links leaves it out); links within FOLDER and a
    Hugging Face cache snapshot's links to its blobs are followed. A retry after a lost response never makes a
    second commit. Prints the commit sha and its URL.

    The token comes from HF_TOKEN, else the systemd credential hf_token
    ($CREDENTIALS_DIRECTORY/hf_token), else `hf auth login`; it needs write
    access. HF_HUB_OFFLINE=1 refuses to push.

    \b
    Examples:
      ckptavg publish out/ema --hub my-org/llama-ema
      ckptavg publish avg/best --hub my-org/run7 --revision averaged -m "EMA, step 12000"
      ckptavg publish out/lawa --hub me/lawa-test --private
    """
    target = HubTarget(repo_id, revision=revision, private=private, endpoint=endpoint)
    source = folder.resolve()
    outside = "skip" if skip_outside_links else "refuse"
    files = folder_files(source, outside_links=outside)
    size = sum(p.stat().st_size for p in files.values())
    shown = f"{folder} → {source}" if source != folder.absolute() else str(folder)
    log.info("publishing %s (%d files, %s) to %s", shown, len(files), format_bytes(size), target.url)
    sha = push_folder(source, target, message=message or f"Upload {source.name} with ckptavg",
                      publish_id=uuid.uuid4().hex, max_attempts=max_attempts, outside_links=outside)
    click.echo(f"{sha} {target.commit_url(sha)}")
