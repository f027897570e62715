"""bridge: run plans written by a strong planner on a local model.

A planner (Claude Code, usually Opus) writes a structured plan into the doobidoo
memory store (mcp-memory-service's SQLite file). bridge picks pending plans up and
runs every step on a local OpenAI-compatible chat-completions server (LM Studio by
default; Ollama, llama.cpp's server and vLLM work the same way): it sends each step
with its context, checks the output, retries with the error fed back, skips what
depended on a failure, writes files atomically inside the project (and puts them back
when a plan asks for it), and stores one result memory per run where Claude Code will
find it.

Usage (one action at most; no action runs every pending plan):
  running
    bridge                      run every pending plan, oldest first
    bridge --plan ID            run one plan; --rerun: a finished or stale one again from
                                the start; --resume: take over a stale one, keeping the
                                steps that had succeeded
    bridge --review [--plan ID] run, staging files under the state dir (awaiting_review)
    bridge --dry-run [--plan ID]  print each step's exact messages; no server, no store write
    bridge --events [--deltas]  run, printing JSON events on stdout: a line per step and
                                plan event (--deltas: and one per streamed piece)
  looking
    bridge --list [--all]       pending plans (--all: every plan and its status)
    bridge --show ID            the last result of a plan, and where its run log is
    bridge --stats              per model and validation type: steps passed first time,
                                after retries, only on escalation, failed; medians
    bridge --health             the model server and the store (and --memory-url's API)
    bridge --diff ID [--run RUN_ID]   what the plan's last run (or that run) changed
    bridge --schema             print the plan JSON Schema
  changing
    bridge --undo ID [--run RUN_ID] [--force]   put back the files that run changed
    bridge --apply ID | --reject ID   write or drop what a --review run staged
    bridge --cancel ID          cancel a plan that is not running nor finished
    bridge --validate FILE      check a plan file: every problem with its JSON path
    bridge --submit FILE [--replace]  store a plan file as a plan memory (a --db naming a
                                new file makes a new, empty 12.x store first)
  trusting (kept in $XDG_CONFIG_HOME/bridge/, never in the store)
    bridge --trust DIR | --untrust DIR   trust a project folder, or take it back
    bridge --approve ID         let one plan run, pinned to its content hash
  Add --json for one JSON document on stdout, -v for prompts and outputs, -q for errors
  only, --debug for the traceback of a bug. Paid and agentic models (anthropic:,
  claude-cli:) run only with --allow-executor NAME (or your own --model / --escalate-to),
  up to --max-cost-usd US dollars a run. A plan outside a trusted project waits for
  --approve or --trust.
  Settings, each with its variable below (bridge --help gives the defaults): --db,
  --base-url, --api-key, --ollama-api, --model, --timeout, --retries, --max-retries,
  --retry-delay, --max-output-bytes, --no-structured, --parallel, --context-length,
  --retry-sampling, --escalate-to, --anthropic-base-url, --price-model, --state-dir,
  --keep-runs, --memory-url, --allow-executor, --max-cost-usd, --pass-env; also
  -v/--verbose, -q/--quiet, --json, --debug, --version, and with their action --all,
  --rerun, --resume, --run, --force, --replace, --deltas. Check commands get no credential of
  your environment but --pass-env's; secrets of bridge's environment are redacted from
  all it stores or prints. A plan only narrows your limits: its timeout_s and
  max_retries count where they are lower.

Exit codes:
    0    success, or nothing to do (plans awaiting approval are not failures)
    1    a plan failed (its result memory says why)
    2    usage, configuration, store or server unusable: said before any plan is
         claimed, or once when the server fails mid-run (a refused key, no such model,
         gone past its retries): the plans not started stay pending, the plan it cut
         stays pending when nothing of it was done, else is left to --resume; or when
         the store cannot be written as a run finishes: its
         result is not stored, the plan stays in_progress (stale once bridge exits)
         with its files and backups kept, bridge --show ID says how to --resume or
         --rerun it, and the other plans still run; --undo refusing (a file changed
         since the run) exits 2 and changes nothing
    70   internal error (a bug: run with --debug or BRIDGE_DEBUG=1 for the traceback)
    130  interrupted (Ctrl-C or SIGTERM)

Environment (a flag wins over its variable):
    BRIDGE_DB, MCP_MEMORY_SQLITE_PATH, MCP_MEMORY_BASE_DIR   the store file (then the
        memory server's default under HOME, or LOCALAPPDATA on Windows)
    BRIDGE_BASE_URL, BRIDGE_MODEL, BRIDGE_TIMEOUT             the model server
    BRIDGE_API_KEY               its key (--api-key), sent to it alone, never printed
    BRIDGE_OLLAMA_API            on Ollama: native (/api/chat, num_ctx set) or openai
    BRIDGE_RETRIES, BRIDGE_RETRY_DELAY, BRIDGE_MAX_OUTPUT_BYTES   its requests
    BRIDGE_MAX_RETRIES           the most further attempts a step gets (--max-retries)
    BRIDGE_PARALLEL, BRIDGE_CONTEXT_LENGTH    steps at once; the model's context (tokens)
    BRIDGE_STRUCTURED=0          never ask for constrained JSON (--no-structured)
    BRIDGE_RETRY_SAMPLING        how retries sample (--retry-sampling)
    BRIDGE_ESCALATE_TO           one more attempt on this model (--escalate-to)
    BRIDGE_PRICE_MODEL           whose prices value the tokens (--price-model)
    ANTHROPIC_BASE_URL, ANTHROPIC_API_KEY     the anthropic: executor
    BRIDGE_ALLOW_EXECUTORS       anthropic, claude-cli, ollama-cloud: comma-separated
                                 (--allow-executor)
    BRIDGE_PASS_ENV              credential variables check commands get all the same,
                                 comma-separated (--pass-env); by default they get none
    BRIDGE_MAX_COST_USD          the spend cap of one run (--max-cost-usd; default 0.50)
    BRIDGE_TRUSTED_PROJECTS      trusted project folders, os.pathsep-separated (besides
                                 --trust): their plans run without approval, and commands
    XDG_CONFIG_HOME              the folder of bridge/trusted-projects.json, approvals.json
    BRIDGE_STATE_DIR, XDG_STATE_HOME          journals, backups and run logs
    BRIDGE_KEEP_RUNS             runs per plan whose backups are kept for --undo
    BRIDGE_MEMORY_URL, MCP_API_KEY            the memory server's HTTP API (loopback),
                                              which embeds results (--memory-url; "off":
                                              none); else the endpoint and key the memory
                                              server's Claude Code hooks use, from
                                              ~/.claude/hooks/config.json (memoryService.http)
    BRIDGE_DEBUG                 tracebacks for bugs (--debug)
    COLUMNS                      the width of --help
    BRIDGE_CRASH_AT              a test hook: the process kills itself at that point

Limits on what bridge reads (hostile input is a recorded failure, never a crash):
    a reply, streamed or not, within --max-output-bytes (a non-streamed body plus
    RESPONSE_ENVELOPE_BYTES); every request by its deadline (a step's timeout_s, else
    DEFAULT_REQUEST_DEADLINE_S = 1800 s) besides --timeout per chunk; JSON from plans,
    the store and servers at most MAX_JSON_DEPTH = 64 levels deep; plan paths within
    NAME_MAX and PATH_MAX. Text from plans, models and the store is printed through
    printable() (control characters escaped); --json through json_text().

Rooms, foundations first: each room uses only names from the rooms above it (a test
keeps it so), so the file reads from files and the store, through plans, model servers
and checks, up to the runner and the command line:
    1 Constants & defaults · 2 Settings: one row per setting, and Config · 3 Errors ·
    4 Helpers · 5 Path rules: what a plan may read and write ·
    6 File writes inside the project ·
    7 bridge's own files: JSON, records, private folders · 8 Store layouts ·
    9 The memory server's HTTP API · 10 Store (SQLite) · 11 Store: plan states and claims ·
    12 Store: plan and result memories · 13 Output validation ·
    14 Constrained JSON and degenerate output · 15 Validation types · 16 Plans ·
    17 Executors: the registry, the chat contract, model references ·
    18 Trust: projects, approvals, executors ·
    19 Model server replies: bounds, errors, streams ·
    20 HTTP executors: requests and retries · 21 Model server probes: what a server runs ·
    22 Ollama's native API · 23 LLM client: OpenAI-compatible servers ·
    24 Other executors: the Anthropic API and the claude CLI · 25 Check commands ·
    26 File transactions: journal, rollback, recovery ·
    27 Review staging and bounded diffs · 28 Kept runs: backups, diff, undo, review ·
    29 Prompts · 30 Retry policy · 31 Run records · 32 The result document ·
    33 Step scheduling · 34 The model's context · 35 An attempt · 36 A step run ·
    37 A plan run: the checked plan, take-over and files · 38 A plan run: its procedure ·
    39 Runner · 40 CLI: arguments and settings ·
    41 CLI: listing, what a run will do, stats, trust and approval · 42 CLI: health ·
    43 CLI: running and showing · 44 CLI: diff, undo, review · 45 CLI: the planner's side ·
    46 main()
"""

from __future__ import annotations

import argparse
import errno
import functools
import heapq
import json
import os
import queue
import re
import signal
import stat
import sys
import threading
import time
from collections import namedtuple
from fnmatch import fnmatchcase
from graphlib import CycleError, TopologicalSorter
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import urlsplit

# Start-up matters (bridge --help, --list): the cheap standard-library modules are
# imported here; the heavy or optional ones (httpx, jsonschema, sqlite3, subprocess,
# hashlib, tempfile, shutil, socket, tomllib, email, logging) where a room first needs
# them, so `bridge --help` loads argparse and little else. Value types are
# collections.namedtuple classes: typing.NamedTuple (typing, and a ForwardRef compiled
# per string annotation) or dataclasses (inspect, ast, dis) cost several milliseconds
# of every start-up. Every annotation is a string, so typing is for type checkers only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import sqlite3
    from typing import Any, Callable, Iterator

__version__ = "0.1.0"

###############################################################################
# 1. Constants & defaults
###############################################################################

SCHEMA_ID = "bridge-plan-v1"
SCHEMA_FILENAME = "bridge-plan-schema.json"

DEFAULT_BASE_URL = "http://localhost:1234/v1"   # LM Studio's server
# The loopback ports discover_server tries, in order, with each one's base URL: LM Studio
# 1234 (lmstudio docs), Ollama 11434 (docs/api.md), llama-server 8080 and 9931 (llama.cpp
# PR #26508), vLLM and llama-cpp-python 8000 (also the memory server's own HTTP port:
# mcp-memory-service claude-hooks/scripts/ensure-server.js).
DEFAULT_SERVER_PORTS = ((1234, "/v1"), (11434, ""), (8080, "/v1"), (9931, "/v1"), (8000, "/v1"))
DISCOVER_TIMEOUT_S = 0.5               # a default port's time to connect and answer
DEFAULT_TIMEOUT_S = 300.0        # a JIT model load can hold the first byte this long
CONNECT_TIMEOUT_S = 10.0
DEFAULT_RETRIES = 4              # transport retries of one request (429, 5xx, refused)
DEFAULT_RETRY_DELAY_S = 1.0      # first backoff delay; doubles each retry
RETRY_MAX_DELAY_S = 30.0
RETRY_BUDGET_S = 120.0           # a request gives up once its retries would pass this
DEFAULT_MAX_OUTPUT_BYTES = 1_000_000   # a reply larger than this is cut
# what a body that is not a stream (/v1/models, "stream" ignored) may have on top of
# --max-output-bytes for its JSON envelope (ids, usage, quotes, escapes)
RESPONSE_ENVELOPE_BYTES = 65_536
ERROR_BODY_MAX_BYTES = 65_536          # of an HTTP error body, only this much is read
# A request ends this many seconds after it was sent, whatever trickles in, unless its
# step sets timeout_s: 16k tokens at 10 tokens/s after a 5-minute model load.
DEFAULT_REQUEST_DEADLINE_S = 1800.0
STORED_OUTPUT_MAX_CHARS = 50_000       # outputs kept whole in the result up to this
LOAD_FILE_MAX_BYTES = 256_000          # a LOAD file larger than this is cut in prompts
# --diff and --review show a unified diff only when both sides are at most this big
# (difflib holds each side's lines several times over); larger files are compared by sha256.
DIFF_MAX_BYTES = 2_000_000
COPY_PIECE_BYTES = 1 << 20             # files are hashed, backed up and restored in pieces this big
# How long a statement waits on a store another process holds locked (SQLite's
# busy_timeout): the memory server's own writes (consolidation, embeddings) take seconds.
STORE_BUSY_TIMEOUT_S = 30.0
STORE_WRITE_TRIES = 5                  # BEGIN IMMEDIATE attempts while the server writes
HEARTBEAT_INTERVAL_S = 30.0            # a running plan refreshes heartbeat_at this often
STALE_AFTER_S = 180.0                  # an in_progress plan with an older heartbeat is stale
MAX_PROMPT_CHARS = 1_000_000           # a step prompt longer than this makes the plan invalid
# A plan memory longer than this (bytes of UTF-8) is never read: SQLite's incremental blob
# I/O gives its size, and it is reported as an invalid plan. Real plans are KBs.
PLAN_MAX_BYTES = 4_000_000
CHARS_PER_TOKEN = 3.5                  # prompt estimate: errs large (real: 3.5-4.5 chars a token)
# A usage token count is believed only from 0 to this (an int): ten times the longest
# context served (Llama 4 Scout's 10M tokens); else it is estimated (usage_count).
USAGE_MAX_TOKENS = 100_000_000
ANSWER_RESERVE_TOKENS = 1024           # kept free for the answer when a step sets no max_tokens
MIN_CUT_CHARS = 200                    # a LOAD file or dependency output cut to fit keeps this
PROBLEMS_SHOWN = 5                     # an invalid plan's error line names this many
DEFAULT_KEEP_RUNS = 10                 # runs per plan whose backups are kept for --undo
RUN_ID_PATTERN = r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}"    # what new_run_id() makes
# JSON bridge did not write nests at most this deep: json, jsonschema (~6 frames) and repr
# recurse per level, Python stops at 1000 frames; a real plan nests ~10-25 levels.
MAX_JSON_DEPTH = 64
NAME_MAX_BYTES = 255                   # a path component, when os.pathconf cannot say
PATH_MAX_BYTES = 4096                  # a whole path, likewise
COMMAND_DEFAULT_TIMEOUT_S = 120.0      # a command validation or verify without timeout_s
COMMAND_MAX_TIMEOUT_S = 3600.0         # the most timeout_s a plan may ask (as the schema)
COMMAND_TAIL_BYTES = 8000              # a command output's end kept for the result and run log
COMMAND_FEEDBACK_CHARS = 3000          # the end of it a retry's prompt shows
# Thinking tokens added to a step's max_tokens when it asks for thinking or its model was
# seen thinking (thinking_reserve): R1 distills and Qwen3 think for hundreds to a few
# thousand tokens before a short answer (LM Studio bug tracker #1990, #1602).
THINKING_RESERVE_TOKENS = 2048

DEFAULT_MAX_RETRIES = 2          # the schema's default: further attempts per step
MAX_RETRIES_LIMIT = 10           # the schema's maximum: --max-retries' default
DEFAULT_ON_FAILURE = "retry_with_context"
# How attempts on the local server sample (--retry-sampling; retry_sampling): "hotter"
# retries at a higher temperature and a new seed, so a retry does not redraw the same
# answer (DSPy's Refine retries hotter; aider's benchmark at temperature 0); "penalty" adds
# repeat_penalty and DRY (dry_multiplier 0.8, "a typical recommended value":
# ggml-org/llama.cpp PR #9702). The default: the README's bench figures (bench/real_model.py).
RETRY_SAMPLING = ("plain", "hotter", "penalty")
DEFAULT_RETRY_SAMPLING = "hotter"
RETRY_TEMPERATURES = (0.0, 0.5, 0.8, 1.0)   # attempt 1 (the step sets none), 2, 3, 4 and on
RETRY_REPEAT_PENALTY = 1.15            # llama.cpp's default is 1.0 (off), LM Studio's 1.1
RETRY_DRY_MULTIPLIER = 0.8
DEFAULT_VALIDATION = {"type": "non_empty"}
DEFAULT_SYSTEM_PROMPT = (
    "You are a careful software engineer executing one step of a larger plan. "
    "Do exactly what the step asks and nothing more. When code or JSON is asked "
    "for, reply with it in a single fenced block and no commentary."
)

# The files of a run's folder (runs/<run_id>/ under --state-dir)
RUN_INFO_FILE = "run.json"          # plan id, run id, project, started_at
JOURNAL_FILE = "journal.jsonl"      # each file's original, before it is touched
STEPS_FILE = "steps.jsonl"          # each finished step, for --resume
STATS_FILE = "stats.jsonl"          # under --state-dir: one line per step run, for --stats
WRITTEN_FILE = "written.jsonl"      # each write that stayed, for --diff and --undo
STAGED_FILE = "staged.jsonl"        # each write a --review run staged
VERIFY_FILE = "verify.jsonl"        # the plan's verify command

ANTHROPIC_BASE_URL = "https://api.anthropic.com"   # https://docs.anthropic.com/en/api/messages
PLAN_TAG = "bridge-plan"
RESULT_TAG = "bridge-result"
PLAN_MEMORY_TYPE = "planning"          # both in the memory server's 12.x ontology
RESULT_MEMORY_TYPE = "tool_outcome"
PLAN_STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled", "awaiting_review")
# What --cancel takes (display statuses): all but a live run and a finished one
CANCELLABLE_STATUSES = ("pending", "stale", "invalid", "awaiting_review")

# What the same tokens would cost on Claude: US dollars per million tokens (input, output).
# Source: https://platform.claude.com/docs/en/about-claude/pricing, as copied by pricing
# tables read 2026-11-21 (docs.rs synaps pricing, cogito-claude); --price-model picks a row.
CLAUDE_PRICES_USD_PER_MTOK = {
    "claude-opus-4-5": (5.00, 25.00),
    "claude-opus-4-1": (15.00, 75.00),
    "claude-sonnet-4-5": (3.00, 15.00),
    "claude-haiku-4-5": (1.00, 5.00),
}
DEFAULT_PRICE_MODEL = "claude-sonnet-4-5"
EVENT_KINDS = ("plan_start", "step_start", "delta", "attempt_failed", "step_end", "plan_end",
               "error")

EXIT_OK = 0
EXIT_PLAN_FAILED = 1
EXIT_UNUSABLE = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504, 529})

# Ollama's APIs (--ollama-api): "native" /api/chat takes options.num_ctx; the OpenAI one
# cannot set it and cuts a long prompt silently (docs/api/openai-compatibility.mdx).
OLLAMA_APIS = ("native", "openai")
# Waits (seconds, with jitter) before resending a stream llama-cpp-python cut to serve
# another request (LLMContention); then the attempt fails as the server's error.
CONTENTION_WAITS_S = (1.0, 2.0, 4.0, 8.0, 15.0)
# The num_ctx a run asks of Ollama: its largest first prompt, answer and slack, in steps,
# at least the minimum, at most the trained context; one value per run, since a new
# num_ctx reloads the model (aider#4687).
OLLAMA_MIN_NUM_CTX = 8192
OLLAMA_NUM_CTX_STEP = 2048
OLLAMA_NUM_CTX_SLACK = 1024
OLLAMA_SHOW_MAX = 32                   # /api/show asked of at most this many models per probe

# The executors by name (register_executor); paid, agentic or remote ones run only when
# allowed (--allow-executor).
EXECUTORS: "dict[str, type[Executor]]" = {}
DEFAULT_EXECUTOR = "openai"     # the executor of a model reference without a prefix


def allowable_executors() -> tuple[str, ...]:
    """The names --allow-executor takes: executors that need allowing, in EXECUTORS order."""
    return tuple(name for name, cls in EXECUTORS.items() if cls.needs_allowing())


# A run's spend cap, US dollars: about five step requests on claude-opus-4-1, seventy on
# claude-haiku-4-5; a looping or hostile plan costs cents.
DEFAULT_MAX_COST_USD = 0.50
TRUST_FILENAME = "trusted-projects.json"  # in config_dir: {"trusted_projects": [path, …]}
APPROVALS_FILENAME = "approvals.json"  # in config_dir: {"approvals": {plan id: {content_hash, …}}}
# What a claude-cli: process gets of the user's environment (an allow-list): PATH finds
# node, HOME and CLAUDE_* hold its login; credentials and BRIDGE_* stay out.
TOOL_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "TMPDIR", "TZ", "LANG", "LANGUAGE",
    "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy",
    "all_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR", "NODE_EXTRA_CA_CERTS", "SYSTEMROOT"})
TOOL_ENV_PREFIXES = ("LC_", "CLAUDE_")
# Variables that hold credentials. A check command gets none of them unless the user names
# it (--pass-env); the value of every variable whose name looks secret (a `_`-separated
# word: GITHUB_TOKEN, AWS_SECRET_ACCESS_KEY, PGPASSWORD; not TOKENIZERS_PARALLELISM) is
# redacted from all bridge stores or prints (redact).
SECRET_ENV_NAME = re.compile(r"(?:^|_)(?:[A-Z0-9]*(?:TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE"
                             r"|APIKEY|CREDENTIALS?)S?|KEYS?|PASS|PAT|CREDS|AUTH|OAUTH|DSN|COOKIE)"
                             r"(?=_|$)")
SECRET_ENV_NAMES = frozenset({"DATABASE_URL", "MYSQL_PWD", "REDIS_URL", "MONGODB_URI", "KUBECONFIG",
                              "DOCKER_CONFIG", "NETRC"})
# the cloud, CI and model-provider families kept out of check commands whole (AWS_REGION too)
SECRET_ENV_PREFIXES = ("AWS_", "AZURE_", "ARM_", "GOOGLE_", "GCP_", "GCLOUD_", "CLOUDSDK_",
                       "ANTHROPIC_", "OPENAI_", "BRIDGE_", "MCP_", "VAULT_", "DIGITALOCEAN_",
                       "HEROKU_", "ACTIONS_", "TWINE_", "HF_", "HUGGING_FACE_")
SECRET_MIN_CHARS = 8                   # a shorter value (1, true, us-east) would hit ordinary text


###############################################################################
# 2. Settings: one row per setting, and Config
###############################################################################

def default_db_candidates(environ: dict[str, str], platform: str = sys.platform) -> list[Path]:
    """Return the store paths the memory server would use, in the order tried: source
    mcp-memory-service config.py, plus the original bridge script's path."""
    home = Path(environ.get("HOME") or Path.home())
    if environ.get("MCP_MEMORY_SQLITE_PATH"):
        return [Path(environ["MCP_MEMORY_SQLITE_PATH"]).expanduser()]
    if environ.get("MCP_MEMORY_BASE_DIR"):
        server_default = Path(environ["MCP_MEMORY_BASE_DIR"]).expanduser() / "sqlite_vec.db"
    elif platform == "darwin":
        server_default = home / "Library" / "Application Support" / "mcp-memory" / "sqlite_vec.db"
    elif platform.startswith("win"):
        local = environ.get("LOCALAPPDATA") or str(home / "AppData" / "Local")
        server_default = Path(local) / "mcp-memory" / "sqlite_vec.db"
    else:
        server_default = home / ".local" / "share" / "mcp-memory" / "sqlite_vec.db"
    return [server_default, home / ".mcp-memory-service" / "memories.db"]


def _xdg_dir(environ: dict[str, str], variable: str, *under_home: str) -> Path:
    if environ.get(variable):
        return Path(environ[variable]).expanduser() / "bridge"
    return Path(environ.get("HOME") or Path.home(), *under_home, "bridge")


def default_config_dir(environ: dict[str, str]) -> Path:
    """Return $XDG_CONFIG_HOME/bridge, else ~/.config/bridge: the user's trust and approvals."""
    return _xdg_dir(environ, "XDG_CONFIG_HOME", ".config")


def default_state_dir(environ: dict[str, str]) -> Path:
    """Return $XDG_STATE_HOME/bridge, else ~/.local/state/bridge."""
    return _xdg_dir(environ, "XDG_STATE_HOME", ".local", "state")


# One row per setting (after bottle's ConfigDict._define). A flag wins over its variable,
# which wins over the default; field: the Config field it fills; kind: how resolve_config
# reads it (_READERS in the room 'CLI: arguments and settings'; None: by lines of its own
# there); limit: a number's least, or the names a choice takes (a tuple, or a function
# returning one, argparse checks too; a dict only resolve_config); what: its name in an
# error; shown: --help's default (None: the default). A tuple default makes the flag
# repeatable and the variable comma-separated. tests/test_first_page.py checks each row's
# flag and variable are on the first page and in the README.
Setting = namedtuple("Setting", "flag env field kind default limit what metavar help shown")
SETTINGS = tuple(map(Setting._make, (
    ("--db", "BRIDGE_DB", "db_paths", None, None, None, "store", "PATH",
     "the memory store file", "MCP_MEMORY_SQLITE_PATH, else the memory server's "
     "sqlite_vec.db, else ~/.mcp-memory-service/memories.db"),
    ("--base-url", "BRIDGE_BASE_URL", "base_url", None, DEFAULT_BASE_URL, None, "base URL", "URL",
     "the OpenAI-compatible server", None),
    ("--api-key", "BRIDGE_API_KEY", "api_key", "text", None, None, "API key", "KEY",
     "the model server's key, sent to it alone as Authorization: Bearer (LM Studio's Require "
     "Authentication, llama-server or vLLM --api-key); the variable keeps it out of ps", "none"),
    ("--ollama-api", "BRIDGE_OLLAMA_API", "ollama_api", "choice", "native", OLLAMA_APIS,
     "Ollama API", None, "on Ollama: native (/api/chat, whose num_ctx bridge sets to fit the "
     "prompts) or openai (/v1/chat/completions: the context cannot be set, and Ollama cuts "
     "long prompts)", None),
    ("--model", "BRIDGE_MODEL", "model", "text", None, None, "model", "ID", "the model to use",
     "the chat model the server reports loaded (README: Model servers)"),
    ("--timeout", "BRIDGE_TIMEOUT", "timeout_s", "number", DEFAULT_TIMEOUT_S, 0.001, "timeout",
     "SECONDS", "seconds a request waits to connect or for the next streamed chunk", None),
    ("--retries", "BRIDGE_RETRIES", "retries", "count", DEFAULT_RETRIES, 0, "retries", "N",
     "retries of one request after 429, 5xx or a connection error", None),
    ("--max-retries", "BRIDGE_MAX_RETRIES", "max_retries", "count", MAX_RETRIES_LIMIT, 0,
     "max retries", "N",
     "the most further attempts a step gets: a plan's max_retries above it is cut to it", None),
    ("--retry-delay", "BRIDGE_RETRY_DELAY", "retry_delay_s", "number", DEFAULT_RETRY_DELAY_S, 0,
     "retry delay", "SECONDS", "first backoff delay, doubled each retry", None),
    ("--max-output-bytes", "BRIDGE_MAX_OUTPUT_BYTES", "max_output_bytes", "count",
     DEFAULT_MAX_OUTPUT_BYTES, 1, "max output bytes", "N",
     "a longer reply is cut and its attempt fails", None),
    ("--no-structured", "BRIDGE_STRUCTURED", "structured", "switch", True, None, "structured",
     None, "never ask the server for constrained JSON (response_format)",
     "ask on json, contains_keys and json_schema steps"),
    ("--retry-sampling", "BRIDGE_RETRY_SAMPLING", "retry_sampling", "choice",
     DEFAULT_RETRY_SAMPLING, RETRY_SAMPLING, "retry sampling", None,
     "how attempt 2 and later sample: plain (as the first), hotter (higher temperature, new "
     "seed), penalty (hotter, plus repeat_penalty/DRY where the server takes them)", None),
    ("--parallel", "BRIDGE_PARALLEL", "parallel", "count", None, 1, "parallel", "N",
     "independent steps in flight at once",
     "the server's own capacity (LM Studio parallel, llama.cpp total_slots), else 1"),
    ("--context-length", "BRIDGE_CONTEXT_LENGTH", "context_length", "count", None, 64,
     "context length", "TOKENS", "the model's context, for fitting prompts",
     "what the server reports for the loaded model (LM Studio, llama.cpp n_ctx, vLLM "
     "max_model_len)"),
    ("--escalate-to", "BRIDGE_ESCALATE_TO", "escalate_to", "text", None, None, "escalation",
     "MODEL", "give a step whose attempts are spent one more attempt on this model (e.g. "
     "anthropic:claude-haiku-4-5, claude-cli:haiku)", "the plan's defaults.escalate_to, else none"),
    ("--allow-executor", "BRIDGE_ALLOW_EXECUTORS", "allowed_executors", None, (DEFAULT_EXECUTOR,),
     allowable_executors, "executor", "NAME", "let steps run on a paid, agentic or remote executor "
     "({choices}); repeatable",
     "none; your own --model and --escalate-to count"),
    ("--max-cost-usd", "BRIDGE_MAX_COST_USD", "max_cost_usd", "number", DEFAULT_MAX_COST_USD, 0,
     "max cost", "USD", "stop paid requests (anthropic:, claude-cli:) once a run has spent this "
     "much", f"{DEFAULT_MAX_COST_USD:.2f}"),
    ("--pass-env", "BRIDGE_PASS_ENV", "pass_env", "names", (), None, "passed variable", "NAME",
     "give check commands (command validations, verify) this credential variable of your "
     "environment all the same; repeatable",
     "none: checks get no token, key, secret, password or cloud/CI variable"),
    ("--anthropic-base-url", "ANTHROPIC_BASE_URL", "anthropic_base_url", "url",
     ANTHROPIC_BASE_URL, None, "Anthropic base URL", "URL",
     "the Anthropic Messages API for anthropic: models (key: ANTHROPIC_API_KEY)", None),
    ("--price-model", "BRIDGE_PRICE_MODEL", "price_model", "choice", DEFAULT_PRICE_MODEL,
     CLAUDE_PRICES_USD_PER_MTOK, "price model", "MODEL",
     "the Claude model whose prices value the tokens a run used",
     f"{DEFAULT_PRICE_MODEL}; one of {', '.join(CLAUDE_PRICES_USD_PER_MTOK)}"),
    ("--memory-url", "BRIDGE_MEMORY_URL", "memory_url", None, None, None, "memory URL", "URL",
     "the memory server's HTTP API on this machine (memory server --http; key: MCP_API_KEY): "
     "result memories are stored through it, so its semantic search finds them; off: never",
     "the loopback endpoint in ~/.claude/hooks/config.json, else none: results are written "
     "into the store directly"),
    ("--state-dir", "BRIDGE_STATE_DIR", "state_dir", None, ".", None, "state folder", "PATH",
     "bridge's own journals and backups", "$XDG_STATE_HOME/bridge or ~/.local/state/bridge"),
    ("--keep-runs", "BRIDGE_KEEP_RUNS", "keep_runs", "count", DEFAULT_KEEP_RUNS, 0, "runs kept",
     "N", "runs per plan whose file backups are kept for --undo; older ones are deleted (0: none "
     "kept)", None),
)))

_CONFIG_DEFAULTS = {                    # the fields of Config no row of SETTINGS fills
    "base_url_given": True,             # False: neither --base-url nor BRIDGE_BASE_URL (discovered)
    "events": False,                    # --events: the run as JSON events on stdout
    "deltas": False,                    # with events: a delta event per streamed piece too
    "db_explicit": False,               # the store came from --db or BRIDGE_DB
    "anthropic_api_key": None,          # str | None: ANTHROPIC_API_KEY
    # the environment less BRIDGE_* and MCP_API_KEY: for command_env and claude_env
    "tool_env": (),                     # tuple[tuple[str, str], ...]
    "trusted_projects": (),             # tuple[Path, ...]: real paths (--trust and
                                        # BRIDGE_TRUSTED_PROJECTS)
    "config_dir": ".",                  # str | Path: the folder of the trust and approvals files
    "home": None,                       # Path | None: the user's home folder
    "memory_api_key": None,             # str | None: MCP_API_KEY, else the hooks' apiKey
    "memory_source": None,              # str | None: where memory_url came from
    "memory_note": None,                # str | None: why the hooks' endpoint is not used
    "crash_at": None,                   # str | None: BRIDGE_CRASH_AT, a test hook
    "review": False,                    # --review: stage the files a run writes
    "verbosity": 1,                     # 0 errors only, 1 progress, 2 prompts and outputs
    "json": False,
    "debug": False,
}


class Config(namedtuple("Config", [*(row.field for row in SETTINGS), *_CONFIG_DEFAULTS],
                        defaults=[*(row.default for row in SETTINGS[1:]),
                                  *_CONFIG_DEFAULTS.values()])):
    """Every setting of one bridge invocation, resolved once (resolve_config): a field per
    row of SETTINGS (its help gives the unit) and per key of _CONFIG_DEFAULTS. db_paths
    (required): the store candidates, first existing wins. allowed_executors: "openai",
    plus those allowed or named by the user's own --model or --escalate-to."""

    __slots__ = ()

    @property
    def runs_dir(self) -> Path:
        """The folder holding one folder per run: state_dir/runs."""
        return Path(self.state_dir, "runs")


###############################################################################
# 3. Errors
#
#   BridgeError (exit 2 unless the class says otherwise)
#    ├── ConfigError            bad flag or environment value
#    ├── StoreError             the store cannot be opened, read or written
#    │    ├── PlanNotFound      no live plan has that id
#    │    └── ResultNotStored   a plan ran, but its result could not be stored
#    ├── PlanInvalid (1)        schema or semantic problems, listed in .problems
#    ├── PathError (1)          a plan path leaves the project or cannot be used
#    │    └── RollbackError (1) files could not be put back; names every one
#    │                          (both in the room 'Path rules: what a plan may read and write')
#    ├── PromptTooLarge (1)     a step's prompt cannot fit the model's context
#    ├── OutputInvalid (1)      a model output failed its step's validation
#    │    └── OutputDegenerate  stopped while it streamed: it degenerated
#    └── LLMError               the model server failed a request
#         ├── LLMUnavailable    connection refused or reset (transient)
#         ├── LLMTimeout        no byte within --timeout (transient)
#         │    └── LLMDeadline  the request's overall deadline passed (not transient)
#         ├── LLMHTTPError      an HTTP error status (transient for 429 and 5xx)
#         ├── LLMProtocolError  a body or stream that is not chat completions
#         ├── LLMContention     a stream the server ended to serve another request
#         └── LLMServerUnusable the server, not the step: a refused key, no such
#                               model, down; stops the run once (exit 2)
###############################################################################


class BridgeError(Exception):
    """Root of every expected failure: a one-line message, an optional hint, a code."""

    exit_code = EXIT_UNUSABLE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class ConfigError(BridgeError):
    """A flag or environment value cannot be used."""


class StoreError(BridgeError):
    """The memory store cannot be opened, read or written as needed."""


class PlanNotFound(StoreError):
    """No live plan memory has the requested id."""


class ResultNotStored(StoreError):
    """A plan ran but the store refused its result (locked or unwritable): the plan stays
    in_progress (stale once this process is gone), its journal and backups kept for
    --resume or --rerun; the run goes on with its other plans and exits 2."""


RUNTIME_DEPENDENCIES = ("httpx", "jsonschema")     # pyproject.toml's dependencies


def missing_dependency_error(exc: BaseException) -> ConfigError | None:
    """The one-line error for an import of httpx or jsonschema (or a module of theirs)
    the running Python lacks (bridge.py outside its venv), or None for any other."""
    name = getattr(exc, "name", None) or ""
    package = name.partition(".")[0]
    if not isinstance(exc, ModuleNotFoundError) or package not in RUNTIME_DEPENDENCIES:
        return None
    return ConfigError(f"bridge needs {package}, which {sys.executable} cannot import",
                       "install httpx and jsonschema: pip install httpx jsonschema "
                       "(or run bridge from its venv: make test builds .venv)")


class PlanInvalid(BridgeError):
    """A plan failed schema or semantic validation; .problems lists every problem."""

    exit_code = EXIT_PLAN_FAILED

    def __init__(self, plan_id: str, problems: list[str]):
        super().__init__(f"plan {plan_id!r} is invalid: " + problems_line(problems))
        self.problems = problems


def problems_line(problems: list[str]) -> str:
    """Return the first PROBLEMS_SHOWN problems joined by "; ", and "and N more"."""
    shown = "; ".join(problems[:PROBLEMS_SHOWN])
    more = len(problems) - PROBLEMS_SHOWN
    return shown + (f"; and {more} more (bridge --validate lists them all)" if more > 0 else "")


class PromptTooLarge(BridgeError):
    """A step's prompt cannot be cut to fit the model's context; the message has the numbers."""

    exit_code = EXIT_PLAN_FAILED


class OutputInvalid(BridgeError):
    """A model output failed its step's validation (the message says how)."""

    exit_code = EXIT_PLAN_FAILED


class OutputDegenerate(OutputInvalid):
    """A streamed output degenerated (DegenerationGuard) and its request was cancelled."""


class LLMError(BridgeError):
    """The model server failed a request. transient: worth retrying the same request;
    retry_after_s: the server's Retry-After, seconds; context_overflow: the prompt does
    not fit the loaded context (resending it unchanged cannot help)."""

    transient = False

    def __init__(self, message: str, hint: str | None = None, *,
                 retry_after_s: float | None = None, context_overflow: bool = False):
        super().__init__(message, hint)
        self.retry_after_s = retry_after_s
        self.context_overflow = context_overflow


class LLMUnavailable(LLMError):
    """The server refused or dropped the connection."""

    transient = True


class LLMTimeout(LLMError):
    """The server sent nothing within the timeout."""

    transient = True


class LLMDeadline(LLMTimeout):
    """A request passed its overall deadline (the step's timeout_s, else
    DEFAULT_REQUEST_DEADLINE_S): not retried, it would run as long again."""

    transient = False


class LLMHTTPError(LLMError):
    """The server answered with an HTTP error status; .status holds it."""

    def __init__(self, message: str, status: int, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.status = status
        self.transient = status in TRANSIENT_STATUSES


class LLMProtocolError(LLMError):
    """The reply was not a chat completion: bad JSON, no choices, a cut stream."""


class LLMContention(LLMError):
    """The server ended a stream to serve another request (llama-cpp-python unless
    --interrupt_requests False: llama_cpp/server/app.py sends [DONE] with no
    finish_reason); sent again after CONTENTION_WAITS_S."""


class LLMServerUnusable(LLMError):
    """A failure of the model server, not of the step: a key refused (401/403), no model
    loaded or able to chat, the server gone past its retries. Every later request would
    fail the same way, so the run stops once (exit 2); the plan it cut is left to
    --resume. status: the HTTP status, or None."""

    def __init__(self, message: str, hint: str | None = None, status: int | None = None):
        super().__init__(message, hint)
        self.status = status


###############################################################################
# 4. Helpers
###############################################################################


def sha256_hex(data: Any) -> str:
    """Return the sha256 (hex) of bytes, or of a binary file object read in pieces from
    where it stands (hashlib.file_digest: memory stays bounded whatever its size)."""
    import hashlib

    if isinstance(data, (bytes, bytearray, memoryview)):
        return hashlib.sha256(data).hexdigest()
    return hashlib.file_digest(data, "sha256").hexdigest()


def content_hash(content: str) -> str:
    """Return the memory server's hash of a memory's content (source: mcp-memory-service
    utils/hashing.py: sha256 of the stripped, lowercased content)."""
    return sha256_hex(content.strip().lower().encode("utf-8"))


def utc_datetime(when: float | str) -> Any:
    """Return an aware UTC datetime of Unix seconds, or of an ISO 8601 text (Z taken; a
    time without an offset is read as UTC). Raises ValueError or OverflowError."""
    from datetime import datetime, timezone

    if not isinstance(when, str):
        return datetime.fromtimestamp(when, timezone.utc)
    moment = datetime.fromisoformat(when.replace("Z", "+00:00"))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def iso_from_ts(ts: float) -> str:
    """Format Unix seconds the way the memory server fills its *_iso columns."""
    return utc_datetime(ts).replace(tzinfo=None).isoformat() + "Z"


def utc_now_iso() -> str:
    """Return the current UTC time as ISO 8601 with a Z, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def clip(text: str, max_chars: int, what: str = "text") -> str:
    """Return text, or its first max_chars characters and a marker saying what was cut."""
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f" [bridge: {what} cut at {max_chars} of {len(text)} characters]"


def pid_alive(pid: int) -> bool:
    """Tell whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def new_run_id() -> str:
    """Return a sortable, unique run id: UTC time plus random hex."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + os.urandom(4).hex()


@functools.cache
def hostname() -> str:
    """Return this host's name, as recorded in a plan's owner."""
    import socket

    return socket.gethostname()


def tag_safe(text: str) -> str:
    """Return text as a memory tag: lowercase, and nothing but [a-z0-9._:-]."""
    return re.sub(r"[^a-z0-9._:-]+", "-", text.lower())


def _write_line(handle: Any, entry: dict, flush: bool = True) -> None:
    """Write one JSON line (redacted) to an open file; with flush, flush it (no fsync)."""
    handle.write(json.dumps(redact(entry), ensure_ascii=False) + "\n")
    if flush:
        handle.flush()


def crash_point(crash_at: str | None, name: str) -> None:
    """Kill this process with SIGKILL at the named point when the crash tests ask
    (BRIDGE_CRASH_AT)."""
    if crash_at == name:
        os.kill(os.getpid(), signal.SIGKILL)


class shielded_signals:
    """Hold SIGINT and SIGTERM off (with a note) while cleanup runs, so a second Ctrl-C
    cannot cut it short. With for_good (the process is on its way out) they stay ignored,
    so a late Ctrl-C cannot turn exit 130 into a traceback. Main thread only."""

    def __init__(self, note: Callable[[str], None], for_good: bool = False):
        self.note, self.saved, self.for_good = note, {}, for_good

    def _refuse(self, signum: int, frame: Any) -> None:
        self.note("finishing cleanup (restoring files, storing the result); please wait")

    def __enter__(self) -> "shielded_signals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
                if sig is not None:
                    self.saved[sig] = signal.signal(sig, self._refuse)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, signal.SIG_IGN if self.for_good else handler)


def usage_cost_usd(usage: dict, price: tuple[float, float]) -> float:
    """Return what usage ({"prompt_tokens", "completion_tokens"}) costs at price (US
    dollars per million input and output tokens), in US dollars, unrounded."""
    return (usage["prompt_tokens"] * price[0] + usage["completion_tokens"] * price[1]) / 1e6


def would_cost_usd(usage: dict, price_model: str) -> float:
    """Return what usage would cost on a Claude model (CLAUDE_PRICES_USD_PER_MTOK), in US
    dollars rounded to 1/10000."""
    return round(usage_cost_usd(usage, CLAUDE_PRICES_USD_PER_MTOK[price_model]), 4)


# Characters a terminal may act on rather than show, as a regex character class: C0 but
# tab and newline, DEL, C1 (U+009B is a one-character CSI), line and paragraph separators,
# the bidi controls that can reorder a line ("Trojan Source"), and lone surrogates (no
# encoder writes them, so a print would crash).
_UNSAFE = "\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"


def _escape(match: Any) -> str:
    code = ord(match.group())
    if code in (0x0A, 0x0D):
        return "\\n" if code == 0x0A else "\\r"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def narrowed(asked: Any, limit: Any) -> Any:
    """Return what a plan asked (a number, or None) when lower than the user's limit, else
    the limit: a plan only narrows the user's limits."""
    return limit if asked is None or asked >= limit else asked


def secret_env_name(name: str) -> bool:
    """True when an environment variable's name says its value is a secret (redacted)."""
    upper = name.upper()
    if upper == "BRIDGE_API_KEY":       # the model server's key (--api-key): a secret
        return True
    if upper.startswith("BRIDGE_"):     # bridge's own settings (BRIDGE_PASS_ENV names one)
        return False
    return upper in SECRET_ENV_NAMES or SECRET_ENV_NAME.search(upper) is not None


def credential_env_name(name: str) -> bool:
    """True when a check command gets this variable only if the user names it (--pass-env)."""
    return secret_env_name(name) or name.upper().startswith(SECRET_ENV_PREFIXES)


# {value: name} of the secrets of bridge's own environment and one pattern matching any,
# longest first: set by remember_secrets, read by redact.
_SECRETS: dict[str, str] = {}
_SECRET_PATTERN: list[Any] = []


def remember_secrets(environ: dict[str, str]) -> None:
    """Take the values redact() hides from environ: those of secret names at least
    SECRET_MIN_CHARS long, but a value also under a harmless name (HOME=/home/me must not
    vanish because some SECRET_DIR says the same)."""
    plain = {v for k, v in environ.items() if not secret_env_name(k)}
    found = {v: k for k, v in sorted(environ.items())
             if secret_env_name(k) and len(v) >= SECRET_MIN_CHARS and v not in plain}
    _SECRETS.clear()
    _SECRETS.update(found)
    longest_first = sorted(found, key=len, reverse=True)
    _SECRET_PATTERN[:] = [re.compile("|".join(map(re.escape, longest_first)))] if found else []


def redact(value: Any) -> Any:
    """Return value with every secret of remember_secrets replaced by "[redacted $NAME]":
    a str, or the strings inside lists, tuples and dicts (keys too); else value itself."""
    if not _SECRET_PATTERN:
        return value
    if isinstance(value, str):
        return _SECRET_PATTERN[0].sub(lambda match: f"[redacted ${_SECRETS[match.group()]}]", value)
    if isinstance(value, dict):
        return {redact(k): redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value) if not hasattr(value, "_fields") else value
    return value


def printable(text: Any, multiline: bool = False) -> str:
    """Return text (redacted) safe to write to a terminal: each character of _UNSAFE
    becomes a visible escape such as \\x1b or \\u202e, and so does a newline (\\n: a
    one-line field cannot forge a line) unless multiline (prompts and outputs). Tabs stay.
    For all text from a plan, a model, a server or the store that is printed."""
    text = redact(str(text))
    pattern = f"[{_UNSAFE}]" if multiline else f"[{_UNSAFE}\\n]"
    return re.sub(pattern, _escape, text) if re.search(pattern, text) else text


# the rest of _UNSAFE, which json.dumps(ensure_ascii=False) leaves raw (it escapes C0);
# outside strings JSON holds none, so \uXXXX escapes keep the same JSON
_JSON_UNSAFE = "[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"


def json_text(document: Any, indent: int | None = None) -> str:
    """Return json.dumps(redact(document), ensure_ascii=False, indent=indent) with
    _JSON_UNSAFE as \\u escapes: the same JSON value, nothing a terminal acts on."""
    text = json.dumps(redact(document), indent=indent, ensure_ascii=False)
    if not re.search(_JSON_UNSAFE, text):
        return text
    return re.sub(_JSON_UNSAFE, lambda match: f"\\u{ord(match.group()):04x}", text)


def quiet_closed_stream(stream: Any) -> None:
    """Point a stream's file descriptor at os.devnull once its reader has gone (a
    BrokenPipeError), so later writes and the flush at exit neither fail nor print
    "Exception ignored" (the Python docs' way for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):   # no real stdout (a test's capture): nothing to point
        pass


class Events:
    """The run as JSON objects, one per line, on stdout (--events): "event" (of
    EVENT_KINDS), "ts" (ISO 8601 UTC, milliseconds), "plan_id", "step_id" for step events,
    and the fields of its kind (README). "delta" events only with deltas (--deltas):
    under Claude Code's Monitor tool a line per token would flood the planner's context.
    Thread-safe."""

    def __init__(self, enabled: bool, stream: Any = None, deltas: bool = False):
        self.enabled, self.stream, self.deltas = enabled, stream, deltas
        self.lock = threading.Lock()

    def emit(self, kind: str, plan_id: str | None = None, step_id: int | None = None,
             **fields: Any) -> None:
        """Write one event line (and flush), when enabled."""
        assert kind in EVENT_KINDS, kind     # the vocabulary is public: README and tests pin it
        if not self.enabled or (kind == "delta" and not self.deltas):
            return
        now = time.time()
        stamp = (time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(now))
                 + f"{int(now % 1 * 1000):03d}Z")
        event = {"event": kind, "ts": stamp, "plan_id": plan_id}
        if step_id is not None:
            event["step_id"] = step_id
        event.update(fields)
        line = json_text(event) + "\n"
        with self.lock:
            stream = self.stream or sys.stdout
            try:
                stream.write(line)
                stream.flush()
            except BrokenPipeError:     # the reader left (bridge --events | head): the run goes on
                self.enabled = False
                quiet_closed_stream(stream)


class Progress:
    """Human progress on stderr, through printable(): a live line per step on a terminal,
    plain lines otherwise. verbosity 0: errors only, 1: progress, 2: prompts and outputs."""

    def __init__(self, verbosity: int = 1, stream: Any = None):
        self.stream = stream or sys.stderr
        self.verbosity = verbosity
        self.live = verbosity >= 1 and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._line = ""
        self._last_draw = 0.0

    def _emit(self, text: str, multiline: bool = False) -> None:
        try:
            if self._line:
                self.stream.write("\r\x1b[2K")
                self._line = ""
            self.stream.write(printable(text, multiline) + "\n")
            self.stream.flush()
        except BrokenPipeError:     # its reader left (bridge 2>&1 | head): the run goes on, unheard
            quiet_closed_stream(self.stream)
            self.live = False

    def info(self, text: str) -> None:
        """Print a progress line (not at -q)."""
        if self.verbosity >= 1:
            self._emit(text)

    def detail(self, text: str) -> None:
        """Print prompts and outputs (only at -v)."""
        if self.verbosity >= 2:
            self._emit(text, multiline=True)

    def retrying(self, text: str) -> None:
        """Print that a request is being retried, and why."""
        self.info(f"  retrying: {text}")

    def error(self, text: str, hint: str | None = None) -> None:
        """Print an error line (and its hint line), always."""
        self._emit(f"bridge: error: {text}")
        if hint:
            self._emit(f"hint: {hint}")

    def warning(self, text: str) -> None:
        """Print a warning line (something worked another way than asked), always."""
        self._emit(f"bridge: warning: {text}")

    def status(self, text: str, force: bool = False) -> None:
        """Redraw the live status line (terminals only, at most 10 times a second)."""
        now = time.monotonic()
        if not self.live or (not force and now - self._last_draw < 0.1):
            return
        self._last_draw = now
        self._line = text
        self.stream.write("\r\x1b[2K" + printable(text)[: terminal_columns() - 1])
        self.stream.flush()


def terminal_columns() -> int:
    """Return the terminal width: $COLUMNS, else stdout's terminal's, else 80: the rule
    of shutil.get_terminal_size, whose import (zlib, bz2, lzma: ~3 ms) argparse's help
    formatter would make at every start-up."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


###############################################################################
# 5. Path rules: what a plan may read and write
#
# Every rule for a path bridge did not choose (a plan's, a journal's, the store's); the rooms
# that read and write files call them and decide none (the model: tarfile's filters).
#   names     plan_path_parts, same_file_path, _check_name_lengths (NAME_MAX, PATH_MAX)
#   inside    resolve_inside, real_path
#   writes    forbidden_target_reason, output_path_problem, journalled_paths
#   reads     open_regular; secret_file_reason, load_secret_reason (what LOAD never sends)
# Writes then walk the project by dir_fd, never through a symlink (the room 'File writes
# inside the project'), so a folder swapped after a check still cannot redirect one.
###############################################################################


class PathError(BridgeError):
    """A plan's path is absolute, climbs out of the project, or cannot be written."""

    exit_code = EXIT_PLAN_FAILED


class RollbackError(PathError):
    """Some files could not be restored; the message names every one."""


_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def open_regular(name: str | Path, dir_fd: int | None = None, encoding: str | None = None,
                 follow_symlinks: bool = False) -> Any:
    """Open a regular file for reading, never waiting on a FIFO, no symlink followed unless
    follow_symlinks: bridge's one way to open a file it reads. Returns a binary file
    object, or with encoding a text one (undecodable bytes replaced). Raises OSError
    (ELOOP: a symlink; EINVAL: not a regular file)."""
    flags = os.O_RDONLY | _CLOEXEC | os.O_NONBLOCK | (0 if follow_symlinks else _NOFOLLOW)
    fd = os.open(name, flags, dir_fd=dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(name))
    if encoding is None:
        return os.fdopen(fd, "rb")
    return os.fdopen(fd, "r", encoding=encoding, errors="replace")


def real_path(path: str | Path) -> Path:
    """bridge's one realpath: path with ~ expanded, symlinks and `..` resolved (need not
    exist); only normalized when a folder swapped under it makes realpath fail (EINVAL)."""
    path = os.path.expanduser(os.fspath(path))
    try:
        return Path(os.path.realpath(path))
    except OSError:
        return Path(os.path.normpath(path))


def plan_path_parts(rel: str) -> list[str]:
    """Return a plan path's components ('.' and empty ones dropped). Raises PathError for one
    empty, with a NUL or lone surrogate, absolute (POSIX, Windows), with '..', or naming the
    project itself."""
    if not rel or "\x00" in rel:
        raise PathError(f"path {rel!r} is empty or holds a NUL byte")
    try:
        os.fsencode(rel)
    except UnicodeEncodeError:
        raise PathError(f"path {rel!r} holds a lone surrogate, which no file name can hold") \
            from None
    windows = PureWindowsPath(rel)
    if PurePosixPath(rel).is_absolute() or windows.is_absolute() or windows.drive:
        raise PathError(f"path {rel!r} is absolute; plan paths are relative to the project")
    if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
        raise PathError(f"path {rel!r} climbs out with '..'")
    parts = list(PurePosixPath(rel).parts)
    if not parts:
        raise PathError(f"path {rel!r} names the project folder itself, not a file")
    return parts


def same_file_path(rel: str) -> str:
    """Return a plan path as the filesystem sees it (./x.py is x.py, a//x.py a/x.py), so
    locking, journaling and reporting agree on one name; one plan_path_parts refuses as
    it is."""
    try:
        return "/".join(plan_path_parts(rel))
    except PathError:
        return rel


# A file bridge writes is first written as .NAME.XXXXXXXX.bridge-tmp beside it (atomic_write)
TEMP_SUFFIX = ".bridge-tmp"
TEMP_NAME_EXTRA_BYTES = len("..XXXXXXXX" + TEMP_SUFFIX)


def _check_name_lengths(project: Path, rel: str) -> None:
    """Raise PathError for a path the filesystem cannot hold: a name over NAME_MAX bytes (a
    file's leaves TEMP_NAME_EXTRA_BYTES for its temp file), a path over PATH_MAX."""
    def limit(name: str, default: int) -> int:
        try:
            return os.pathconf(project, name)
        except (OSError, ValueError):
            return default

    name_max = limit("PC_NAME_MAX", NAME_MAX_BYTES)
    parts = [part for part in rel.replace("\\", "/").split("/") if part]
    shown = rel if len(rel) <= 60 else rel[:40] + "…"
    for n, part in enumerate(parts):
        room = name_max - (TEMP_NAME_EXTRA_BYTES if n == len(parts) - 1 else 0)
        if (size := len(part.encode("utf-8", "surrogatepass"))) > room:
            raise PathError(f"path {shown!r} has a name of {size} bytes; names here hold at "
                            f"most {room} bytes (file names keep {TEMP_NAME_EXTRA_BYTES} for "
                            "bridge's temp file)")
    path_max = limit("PC_PATH_MAX", PATH_MAX_BYTES)
    whole = len(os.fsencode(str(project.absolute()))) + 1 \
        + len(rel.encode("utf-8", "surrogatepass"))
    if whole + TEMP_NAME_EXTRA_BYTES > path_max:
        raise PathError(f"path {shown!r} is {whole} bytes long in {project}; paths here hold "
                        f"at most {path_max - TEMP_NAME_EXTRA_BYTES} bytes")


def resolve_inside(project: Path, rel: str) -> Path:
    """Return project/rel once plan_path_parts and _check_name_lengths accept rel and its
    real location (symlinks followed) lies inside the project's. Raises PathError."""
    plan_path_parts(rel)
    _check_name_lengths(project, rel)
    try:        # Path.resolve, not real_path: it says so for a symlink loop (RuntimeError, 3.11)
        root = project.resolve()
        target = (project / rel).resolve()
    except (OSError, RuntimeError) as exc:
        raise PathError(f"path {rel!r} cannot be resolved in {project} ({exc})") from None
    if not target.is_relative_to(root):
        raise PathError(f"path {rel!r} leads outside the project through a symlink (to {target})")
    return project / rel


STORE_SIDECARS = ("", "-wal", "-shm", "-journal")       # SQLite's files beside a store


class Guard(namedtuple("Guard", "stores state_dir", defaults=((), None))):
    """What no plan may write: stores (the memory store Paths, with their STORE_SIDECARS)
    and state_dir (bridge's journals, backups and run logs)."""

    __slots__ = ()

    @classmethod
    def of(cls, config: Config) -> "Guard":
        """The store candidates and the state dir of a config."""
        return cls(tuple(config.db_paths), config.state_dir)


# Folders of version-control systems, whose hooks and config run commands on the system's
# next command (git: hooks/, core.fsmonitor, core.hooksPath; Mercurial: [hooks] in hgrc).
VCS_FOLDERS = (".git", ".hg", ".svn", ".jj", ".bzr", "_darcs")


# What some disk drops when it looks a name up, so the name still opens a VCS folder: code
# points HFS+ and APFS ignore (git's utf8.c is_hfs_dotgit), trailing dots and spaces
# (NTFS, FAT), 8.3 short names (GIT~1).
_NAME_IGNORED = "[\u200c-\u200f\u202a-\u202e\u206a-\u206f\ufeff]"


def vcs_folder_of(name: str) -> str | None:
    """Return the VCS folder a path component opens on some disk, or None: ".GIT", ".git.",
    ".g\u200cit", "GIT~1" all give ".git"."""
    seen = re.sub(_NAME_IGNORED, "", name).rstrip(" .").casefold()
    for folder in VCS_FOLDERS:
        if seen in (folder, folder.lstrip(".")[:6] + "~1"):
            return folder
    return None


def _is_git_dir(folder: str | Path) -> bool:
    """Whether folder, whatever its name, is a git directory by git's test (setup.c
    is_git_directory): a HEAD file, and objects/ and refs/ or a commondir file."""
    if not os.path.isfile(os.path.join(folder, "HEAD")):
        return False
    inside = functools.partial(os.path.join, folder)
    return os.path.isfile(inside("commondir")) or (
        os.path.isdir(inside("objects")) and os.path.isdir(inside("refs")))


def _gitdir_named(folder: str | Path) -> Path | None:
    """The real path a `.git` file in folder points to (git's gitfile "gitdir: PATH"), or None."""
    try:
        handle = open_regular(os.path.join(folder, ".git"), follow_symlinks=True)
    except OSError:         # none, unreadable, or a folder: a real .git, refused by its name
        return None
    with handle:
        head = handle.read(4096).decode("utf-8", "replace")
    if not head.startswith("gitdir:"):
        return None
    target = head[len("gitdir:"):].split("\n")[0].strip()
    return real_path(os.path.join(folder, target)) if target else None


def vcs_target_reason(project: Path, rel: str) -> str | None:
    """Return why project/rel lies in a version-control folder, or None: a component of
    rel or of the project's path (as given, absolute, real) that opens one (vcs_folder_of),
    a git directory of any name above the target (a bare repository, a worktree's gitdir),
    or the gitdir a `.git` file above it points to."""
    for part in PurePosixPath(rel.replace("\\", "/")).parts:
        if folder := vcs_folder_of(part):
            return (f"path {rel!r} is under {part}/ ({folder}: its hooks and config run "
                    "commands); bridge never writes there")
    root = real_path(project)
    for shown in dict.fromkeys((os.path.abspath(project), str(root))):
        for part in PurePosixPath(shown).parts:
            if folder := vcs_folder_of(part):
                return (f"project {project} lies inside {part}/ ({folder}: its hooks and config "
                        "run commands); bridge never writes there")
    target = real_path(root / rel)
    for folder in target.parents:
        gitdir = _gitdir_named(folder)
        if _is_git_dir(folder) or (gitdir is not None and target.is_relative_to(gitdir)):
            where = folder if _is_git_dir(folder) else gitdir
            return f"path {rel!r} lies in the git directory {where}; bridge never writes there"
    return None


def forbidden_target_reason(project: Path, rel: str, guard: Guard | None = None) -> str | None:
    """Return why project/rel (a path plan_path_parts accepts) may never be written, or
    None: in a version-control folder, the store or its sidecars, in the state dir;
    compared as written and as real. The rule of validation and writes."""
    if reason := vcs_target_reason(project, rel):
        return reason
    guard = guard or Guard()
    root = real_path(project)
    targets = {root / rel, real_path(root / rel)}
    for store in guard.stores:
        real = real_path(store)
        if targets & {real.with_name(real.name + sidecar) for sidecar in STORE_SIDECARS}:
            return f"path {rel!r} is the memory store {store}; bridge never writes it"
    if guard.state_dir is not None:
        state = real_path(guard.state_dir)
        if any(t.is_relative_to(state) for t in targets):
            return (f"path {rel!r} is in bridge's state dir {guard.state_dir}; "
                    "bridge never writes there")
    return None


def output_path_problem(project: Path, rel: str, guard: Guard | None) -> str | None:
    """Why a step may not write rel (its file_output) in project, or None: a folder, what
    resolve_inside or forbidden_target_reason refuse, a symlink on its way, not a regular
    file."""
    if rel.replace("\\", "/").rsplit("/", 1)[-1] in ("", "."):
        return f"{rel!r} names a folder, not a file; give the file's name (e.g. newdir/notes.md)"
    try:
        if resolve_inside(project, rel).is_dir():
            return f"{rel!r} is a folder"
    except PathError as exc:
        return str(exc)
    if reason := forbidden_target_reason(project, rel, guard):
        return reason
    path = project
    for part in PurePosixPath(rel).parts:
        path = path / part
        try:
            kind = os.lstat(path).st_mode
        except OSError:
            return None
        if stat.S_ISLNK(kind):
            return (f"path {rel!r} goes through the symlink {part!r}; bridge writes only "
                    "through real folders of the project")
    if not stat.S_ISREG(kind):
        return (f"path {rel!r} is not a regular file (a FIFO, socket or device); bridge writes "
                "only files")
    return None


def journalled_paths(project: Path, entry: dict, backups: Path,
                     guard: Guard | None = None) -> tuple[str, Path | None, list[Path]]:
    """Check an entry of a run's journal.jsonl (read back: untrusted): "path" a plan path
    that may be written, "backup" a file right in backups (real paths), each of
    "created_dirs" an absolute folder below project. Returns (path, backup or None,
    created_dirs). Raises PathError."""
    rel, backup, folders = entry.get("path"), entry.get("backup") or "", entry.get("created_dirs")
    if not isinstance(rel, str):
        raise PathError(f"path {rel!r} is not a string")
    plan_path_parts(rel)
    if reason := forbidden_target_reason(project, rel, guard):
        raise PathError(reason)
    if backup and (not isinstance(backup, str) or real_path(backup).parent != real_path(backups)):
        raise PathError(f"path {rel!r}: backup {backup!r} is not in {backups}")
    if not isinstance(folders or [], list):
        raise PathError(f"path {rel!r}: created_dirs {folders!r} is not a list of folders")
    dirs = []
    for folder in folders or []:
        inside = None
        if isinstance(folder, str) and Path(folder).is_absolute() \
                and Path(folder).is_relative_to(project):
            inside = Path(folder).relative_to(project)
        if inside is None or not inside.parts:
            raise PathError(f"path {rel!r}: folder {folder!r} is not inside the project {project}")
        plan_path_parts(inside.as_posix())
        dirs.append(project / inside)
    return rel, Path(backup) if backup else None, dirs


# What LOAD never sends to a model: (pattern, what it holds). A pattern ending in "/" is a
# folder anywhere on the path (a/b/: two in a row); else it matches the file's name or, with
# a "/", its path's last components. Shell globs, any case. The README's table is this one.
SECRET_LOAD_TABLE = (
    (".ssh/", "SSH keys and config"), (".gnupg/", "GnuPG private keys"),
    (".aws/", "AWS CLI credentials"), (".azure/", "Azure CLI tokens"),
    (".config/gcloud/", "Google Cloud CLI credentials"), (".oci/", "Oracle Cloud keys"),
    (".config/doctl/", "DigitalOcean CLI token"), (".config/gh/", "GitHub CLI token"),
    (".config/hub", "hub's GitHub token"), (".kube/", "Kubernetes cluster credentials"),
    (".docker/", "registry logins (config.json)"), (".terraform.d/", "Terraform Cloud tokens"),
    (".password-store/", "pass's password store"), (".subversion/auth/", "Subversion logins"),
    *((f"{folder}/", "version-control metadata: remote URLs with tokens (.git/config), [auth]")
      for folder in VCS_FOLDERS),
    ("id_*", "SSH private key (id_*.pub is public)"), ("*.ppk", "PuTTY private key"),
    ("*.pem", "private key or certificate"), ("*.key", "private key"), ("*.p12", "key store"),
    ("*.pfx", "key store"), ("*.jks", "Java key store"), ("*.keystore", "key store"),
    ("*.kdbx", "KeePass database"), (".env", "environment secrets"),
    (".env.*", "environment secrets"), (".envrc", "direnv secrets"),
    (".netrc", "logins"), ("_netrc", "logins"), (".pgpass", "PostgreSQL passwords"),
    (".my.cnf", "MySQL password"), (".mylogin.cnf", "MySQL logins"),
    (".npmrc", "npm token"), (".yarnrc", "yarn token"), (".yarnrc.yml", "yarn token"),
    (".pypirc", "PyPI token"), ("pip.conf", "index URL with a password"),
    (".gem/credentials", "RubyGems key"), (".cargo/credentials", "crates.io token"),
    (".cargo/credentials.toml", "crates.io token"), ("auth.json", "Composer logins"),
    (".git-credentials", "git's stored passwords"), (".htpasswd", "password hashes"),
    (".vault-token", "Vault token"), (".terraformrc", "Terraform tokens"),
    ("terraform.rc", "Terraform tokens"), ("*.tfstate", "Terraform state (secrets in clear)"),
    ("*.tfstate.backup", "Terraform state"),
    ("*.tfvars", "Terraform variables (often secrets)"), ("kubeconfig", "Kubernetes credentials"),
    (".dockercfg", "registry logins"), (".s3cfg", "S3 keys"), (".boto", "cloud keys"),
    ("credentials", "cloud CLI credentials"), ("credentials.json", "OAuth or service-account keys"),
    ("credentials.*.json", "credentials"), ("client_secret*.json", "OAuth client secret"),
    ("*service-account*.json", "service-account key"), ("secrets.toml", "app secrets (Streamlit)"),
    ("secrets.json", "app secrets"), ("secrets.yml", "app secrets"),
    ("secrets.yaml", "app secrets"),
)


# Names LOAD reads although a row above matches: public keys, samples
SECRET_LOAD_SAMPLES = ("*.pub", "*.example", "*.sample", "*.template", "*.dist")


# What a backup or editor copy adds to a name (id_rsa.bak, .npmrc~): checked without it
_BACKUP_SUFFIX = r"(?:\.(?:bak|backup|old|orig|save|sav|swp|swo|tmp|copy|prev|[0-9]+)|~)+$"


def _secret_row(parts: list[str]) -> tuple[str, str] | None:
    """The row of SECRET_LOAD_TABLE a path (its components) matches, or None."""
    parts = [part.casefold() for part in parts]
    folders, name = parts[:-1], parts[-1]
    names = {name, re.sub(_BACKUP_SUFFIX, "", name)} - {""}
    if name.startswith("id_") and "." not in re.sub(_BACKUP_SUFFIX, "", name):
        return "id_*", "SSH private key (id_*.pub is public)"
    for pattern, holds in SECRET_LOAD_TABLE:
        seq = pattern.rstrip("/").casefold().split("/")
        if pattern.endswith("/"):
            if any(folders[i:i + len(seq)] == seq for i in range(len(folders) - len(seq) + 1)):
                return pattern, holds
            continue
        if pattern == "id_*":       # only a name with no dot: id_rsa, not id_generator.py
            continue
        if any(any(fnmatchcase(n, sample) for sample in SECRET_LOAD_SAMPLES) for n in names):
            continue
        last_folders = folders[len(folders) - len(seq) + 1:]
        head = [fnmatchcase(part, glob) for part, glob in zip(last_folders, seq)]
        if len(seq) <= len(parts) and all(head) and any(fnmatchcase(n, seq[-1]) for n in names):
            return pattern, holds
    return None


def secret_file_reason(rel: str) -> str | None:
    """Return why a LOAD path (or a file's absolute real one) looks like a private key or
    secret store, or None (its text would go to the model, the result and the run logs)."""
    parts = [part for part in PurePosixPath(rel.replace("\\", "/")).parts if part != "/"]
    row = _secret_row(parts) if parts else None
    if row is None:
        return None
    pattern, holds = row
    if pattern.endswith("/"):
        return (f"LOAD file {rel!r} is in {pattern} ({holds}), which holds secrets; bridge "
                "does not send it to a model")
    return (f"LOAD file {rel!r} looks like a private key or secret store ({pattern}: {holds}); "
            "bridge does not send it to a model (name it as REFERENCE, or give the model what it "
            "needs another way)")


def load_secret_reason(project: "Path", rel: str, path: "Path") -> str | None:
    """Why a LOAD of rel (path: where it resolved inside project) may not go to a model, or
    None: secret_file_reason of rel, of it in the real project, or of its real path (a
    project inside ~/.aws). The rule of validation and of approval."""
    real = real_path(path)
    inside = os.path.relpath(real, real_path(project))
    return secret_file_reason(rel) or secret_file_reason(inside) or secret_file_reason(str(real))


###############################################################################
# 6. File writes inside the project
#
# Every write goes to a temp file in the target's folder, then os.replace: a reader sees
# the old bytes or the new, never half. In the project the folders are walked by dir_fd,
# never through a symlink; every file bridge reads is opened by open_regular.
###############################################################################


class FileChange:
    """What one run did to one path: action "created" or "modified" ("reverted" after a
    rollback); backup: the original's copy, if any; mode: its permission bits;
    created_dirs: folders the run made for it, deepest last."""

    __slots__ = ("path", "action", "backup", "mode", "created_dirs")

    def __init__(self, path: str, action: str, backup: Path | None = None, mode: int | None = None,
                 created_dirs: list[Path] | None = None):
        self.path, self.action, self.backup, self.mode = path, action, backup, mode
        self.created_dirs = created_dirs or []


_DIR_OPEN = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
# POSIX has the dir_fd operations every write walks the project with; Windows has not
_HAS_DIR_FD = {os.open, os.mkdir, os.unlink, os.rmdir, os.stat} <= os.supports_dir_fd


def _open_root(project: Path) -> int:
    """Open the project folder for the dir_fd walks; PathError when it cannot be, or
    when this system has no dir_fd operations (POSIX has)."""
    if not _HAS_DIR_FD:
        raise PathError(f"cannot write safely in {project}: this system has no dir_fd file "
                        "operations", "run bridge on Linux or macOS")
    try:
        return os.open(project, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
    except OSError as exc:
        raise PathError(f"cannot open the project folder {project}: {exc.strerror or exc}") from exc


def _walk(dir_fd: int, parts: list[str], rel: str, make: bool = False) -> tuple[int, int]:
    """Open the folders parts one at a time below dir_fd, never through a symlink: return
    (descriptor of the deepest one reached, its depth), which the caller closes. With
    make, missing folders are made (0o777 less the umask); else the walk stops at the
    first missing one. Raises PathError (a symlink or not a folder) or OSError."""
    fd, depth = os.dup(dir_fd), 0
    try:
        for depth, part in enumerate(parts):
            try:
                step = os.open(part, _DIR_OPEN, dir_fd=fd)
            except FileNotFoundError:
                if not make:
                    return fd, depth
                with _suppress(FileExistsError):
                    os.mkdir(part, 0o777, dir_fd=fd)
                step = os.open(part, _DIR_OPEN, dir_fd=fd)
            os.close(fd)
            fd = step
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            where = "/".join(parts[:depth + 1])
            raise PathError(f"path {rel!r}: {where!r} is a symlink or not a folder; bridge "
                            "writes only through real folders of the project") from exc
        raise
    return fd, len(parts)


def open_inside(project: Path, rel: str) -> Any:
    """Open project/rel for reading (a binary file object) through real folders, no
    symlink followed. Raises FileNotFoundError, PathError (a symlink on the way, not a
    regular file) or OSError (IsADirectoryError on reading a folder)."""
    parts = plan_path_parts(rel)
    root = _open_root(project)
    try:
        fd, depth = _walk(root, parts[:-1], rel)
    finally:
        os.close(root)
    try:
        if depth < len(parts) - 1:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), rel)
        flags = os.O_RDONLY | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK     # a FIFO must not block
        try:
            handle = os.fdopen(os.open(parts[-1], flags, dir_fd=fd), "rb")
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PathError(f"path {rel!r} is a symlink; bridge reads and writes only real "
                                "files of the project") from exc
            raise
        kind = os.fstat(handle.fileno()).st_mode
        if not (stat.S_ISREG(kind) or stat.S_ISDIR(kind)):     # a folder: reading it says so
            handle.close()
            raise PathError(f"path {rel!r} is not a regular file (a FIFO, socket or device)")
        return handle
    finally:
        os.close(fd)


def read_load_file(path: Path, rel: str, project: Path | None = None) -> str:
    """Return the text of a LOAD file for a prompt: project/rel by open_inside, else path;
    cut at LOAD_FILE_MAX_BYTES with a marker. Raises FileNotFoundError, or PathError
    (unreadable, a symlink on the way, binary: a NUL byte, or not UTF-8)."""
    try:
        with (open_inside(project, rel) if project is not None else open(path, "rb")) as handle:
            data = handle.read(LOAD_FILE_MAX_BYTES + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise PathError(f"LOAD file {rel!r} cannot be read ({exc.strerror or exc})") from exc
    if b"\x00" in data:
        raise PathError(f"LOAD file {rel!r} is binary; name it as REFERENCE instead")
    cut = len(data) > LOAD_FILE_MAX_BYTES
    data = data[:LOAD_FILE_MAX_BYTES]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not (cut and exc.start >= len(data) - 3):   # only a character split by the cut is fine
            raise PathError(f"LOAD file {rel!r} is not UTF-8 text (byte {exc.start}); "
                            "name it as REFERENCE instead") from exc
        text = data[:exc.start].decode("utf-8")
    if cut:
        text += f"\n[bridge: {rel} cut at {LOAD_FILE_MAX_BYTES} bytes]"
    return text


def _file_mode(dir_fd: int, name: str, rel: str) -> int | None:
    """Return the permission bits of the file name in dir_fd, None when there is none.
    Raises PathError when it is a symlink, a folder or not a regular file."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        raise PathError(f"path {rel!r} is a symlink; bridge does not write through or over "
                        "symlinks")
    if stat.S_ISDIR(info.st_mode):
        raise PathError(f"path {rel!r} is a folder")
    if not stat.S_ISREG(info.st_mode):     # a FIFO would hang the read of its original
        raise PathError(f"path {rel!r} is not a regular file (a FIFO, socket or device); bridge "
                        "writes only files")
    return info.st_mode & 0o7777


def file_sha256(name: str | Path, dir_fd: int | None = None) -> str | None:
    """Return the sha256 (hex) of a regular file, read in pieces; None when it is missing,
    a symlink, not a regular file or unreadable."""
    try:
        with open_regular(name, dir_fd) as handle:
            return sha256_hex(handle)
    except OSError:
        return None


def _same_bytes(handle: Any, name: str, dir_fd: int) -> bool:
    """Tell whether the open binary file handle (read from its start) holds the same bytes
    as the regular file name in dir_fd, compared in pieces."""
    try:
        other = open_regular(name, dir_fd)
    except OSError:
        return False
    with other:
        if os.fstat(other.fileno()).st_size != os.fstat(handle.fileno()).st_size:
            return False
        handle.seek(0)
        while True:
            piece = handle.read(COPY_PIECE_BYTES)
            if piece != other.read(COPY_PIECE_BYTES):
                return False
            if not piece:
                return True


def _write_all(fd: int, data: Any) -> None:
    """Write bytes, or everything a binary file object holds from where it stands (copied
    COPY_PIECE_BYTES at a time), to fd."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        for piece in iter(lambda: data.read(COPY_PIECE_BYTES), b""):
            _write_all(fd, piece)
        return
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _replace_in(dir_fd: int, name: str, data: Any, mode: int | None,
                crash_at: str | None = None) -> None:
    """Write data (bytes, or a binary file object copied in pieces) to name in the folder
    dir_fd by a temp file beside it and os.replace, both relative to dir_fd (a folder
    swapped meanwhile cannot redirect them). mode: the file's bits (None: the umask's).
    Raises OSError; the temp file outlives only a crash."""
    tmp = f".{name}.{os.urandom(4).hex()}{TEMP_SUFFIX}"
    fd = os.open(tmp, _NEW_FILE, 0o600 if mode is not None else 0o666, dir_fd=dir_fd)
    try:
        try:
            _write_all(fd, data)
            if mode is not None:
                os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        crash_point(crash_at, "replace")
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with _suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


class _suppress:
    """contextlib.suppress without importing contextlib at start-up."""

    def __init__(self, *kinds: type[BaseException]):
        self.kinds = kinds

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        return kind is not None and issubclass(kind, self.kinds)


###############################################################################
# 7. bridge's own files: JSON, records, private folders
#
# JSON bridge did not write is read by load_json (depth-bounded, no NaN). bridge's own
# files have one of each: atomic_write, read_json_file, write_json_file, append_jsonl,
# read_jsonl, private_dir, private_opener; run_folder checks a run id read back.
###############################################################################


class JSONRefused(ValueError):
    """JSON that json parses but bridge will not take: nested deeper than MAX_JSON_DEPTH,
    or holding NaN or Infinity (not JSON, RFC 8259; they pass every schema bound)."""


def _refuse_constant(name: str) -> Any:
    raise JSONRefused(f"holds {name}, which is not JSON (RFC 8259)")


def json_depth(value: Any) -> int:
    """Return how deep a parsed JSON value nests (a scalar is 0, [] is 1), without
    recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        children = item.values() if isinstance(item, dict) else item
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def load_json(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads with a nesting limit, for JSON bridge did not write, so what reads it
    next cannot recurse to death. Raises ValueError for bad JSON, JSONRefused (a
    ValueError) for NaN or Infinity, or past max_depth levels (or json's own limit)."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise JSONRefused(f"nests deeper than {max_depth} levels (more than json can parse)") \
            from None
    depth = json_depth(value)
    if depth > max_depth:
        raise JSONRefused(f"nests {depth} levels deep; bridge reads at most {max_depth}")
    return value


def load_reply(text: str | bytes) -> Any:
    """load_json for what a server or executor sent, with every lone surrogate in its
    strings (a JSON "\\ud800" escape, which no UTF-8 text, file or store can hold)
    replaced by U+FFFD. Raises ValueError as load_json."""
    value = load_json(text)
    escaped = b"\\u" in text if isinstance(text, bytes) else "\\u" in text
    return _scrub_surrogates(value) if escaped else value     # surrogates come only from \u escapes


def _scrub_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return re.sub("[\ud800-\udfff]", "\ufffd", value)
    if isinstance(value, list):
        return [_scrub_surrogates(item) for item in value]
    if isinstance(value, dict):     # at most MAX_JSON_DEPTH deep (load_json), so recursion is safe
        return {_scrub_surrogates(key): _scrub_surrogates(item) for key, item in value.items()}
    return value


def atomic_write(path: Path, data: bytes, mode: int | None = None,
                 crash_at: str | None = None) -> None:
    """bridge's one atomic writer: data to path by _replace_in. mode: the file's
    permission bits (None: the umask's). Raises OSError."""
    dir_fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
    try:
        _replace_in(dir_fd, path.name, data, mode, crash_at)
    finally:
        os.close(dir_fd)


OWN_FILE_MAX_BYTES = 16_000_000     # a JSON file of bridge's own larger than this is not its


def read_json_file(path: Path, follow_symlinks: bool = False, or_none: bool = False,
                   max_bytes: int = OWN_FILE_MAX_BYTES) -> Any:
    """bridge's one JSON file reader: the value of a regular file (open_regular; with
    follow_symlinks, which a dotfile manager needs for the trust, approvals and hooks
    files) of at most max_bytes, UTF-8, by load_json. Raises OSError (ELOOP: a symlink;
    EINVAL: not a regular file, a FIFO) or ValueError; with or_none, returns None."""
    try:
        with open_regular(path, follow_symlinks=follow_symlinks) as handle:
            data = handle.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ValueError(f"it is larger than {max_bytes:,} bytes")
        return load_json(data.decode("utf-8"))
    except (OSError, ValueError):
        if or_none:
            return None
        raise


def write_json_file(path: Path, document: Any, indent: int | None = None) -> None:
    """bridge's one JSON file writer: document and a newline to path, 0o600, by
    atomic_write. Raises OSError."""
    text = json.dumps(document, ensure_ascii=False, indent=indent) + "\n"
    atomic_write(path, text.encode("utf-8"), 0o600)


def private_dir(path: Path, tighten: bool = False) -> Path:
    """bridge's one private folder maker: path and its missing parents, 0o700; return
    path. An existing folder keeps its mode unless tighten. Raises OSError."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        private_dir(os.path.dirname(os.path.abspath(path)))
        with _suppress(FileExistsError):
            os.mkdir(path, 0o700)
    if tighten:
        os.chmod(path, 0o700)
    return path


def private_opener(path: str, flags: int) -> int:
    """open()'s opener for bridge's own records: new files are 0o600, never through a symlink."""
    return os.open(path, flags | _NOFOLLOW | _CLOEXEC, 0o600)


def run_folder(runs_dir: Path, run_id: Any) -> Path:
    """Return runs_dir/run_id for a run id read back from the store (nothing read back is
    a path): it must match RUN_ID_PATTERN whole, and its folder, when it exists, be a
    real folder right in runs_dir. Raises PathError."""
    if not isinstance(run_id, str) or not re.fullmatch(RUN_ID_PATTERN, run_id):
        raise PathError(f"run id {clip(repr(run_id), 80, 'run id')} is not a bridge run id "
                        "(like 20261204T192316Z-1a2b3c4d); its files are left alone")
    folder = runs_dir / run_id
    try:
        info = os.lstat(folder)
    except FileNotFoundError:
        return folder
    if folder.parent != runs_dir or not stat.S_ISDIR(info.st_mode):
        raise PathError(f"run folder {folder} is not a folder of bridge's runs (a symlink?); "
                        "its files are left alone")
    return folder


def append_jsonl(path: Path, entry: dict, sync: bool = True) -> None:
    """Append one JSON line to path (a new file 0o600, missing folders 0o700, no symlink
    followed); with sync, fsync it. Raises OSError."""
    try:
        handle = open(path, "a", encoding="utf-8", opener=private_opener)
    except FileNotFoundError:
        private_dir(path.parent)
        handle = open(path, "a", encoding="utf-8", opener=private_opener)
    with handle:
        handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        if sync:
            handle.flush()
            os.fsync(handle.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """Return the JSON objects of a .jsonl file; a torn last line (a crash) is ignored.
    Raises OSError (ELOOP: a symlink)."""
    entries = []
    try:
        with open_regular(path) as handle:
            lines = handle.read().decode("utf-8", "replace").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            entry = load_json(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


###############################################################################
# 8. Store layouts
#
# The store belongs to the memory server, which may have it open right now (facts:
# mcp-memory-service storage/sqlite_vec.py and its migrations). Never UPDATE content (its
# FTS trigger would corrupt the index); a plan's state lives in STATE_TABLE, never in
# metadata, which the server rewrites after every semantic search; short transactions
# only; never touch memory_embeddings (needs the vec0 extension).
###############################################################################

LAYOUT_12 = "doobidoo 12.x"
LAYOUT_10 = "doobidoo 10.x"
LAYOUT_ORIGINAL = "original bridge"
_LAYOUT_COLUMNS = {
    LAYOUT_12: {"id", "content_hash", "content", "tags", "memory_type", "metadata",
                "created_at", "updated_at", "created_at_iso", "updated_at_iso",
                "deleted_at", "store", "superseded_by", "embedding_pending"},
    LAYOUT_10: {"id", "content_hash", "content", "tags", "memory_type", "metadata",
                "created_at", "updated_at", "created_at_iso", "updated_at_iso",
                "deleted_at"},
    LAYOUT_ORIGINAL: {"id", "content", "metadata", "created_at"},
}


# The 12.x layout as mcp-memory-service 12.2.0 creates it (storage/sqlite_vec.py), but the
# vec0 embeddings table, which the server creates (IF NOT EXISTS) when it opens the file.
STORE_DDL_12 = """
CREATE TABLE memories (
    id INTEGER PRIMARY KEY AUTOINCREMENT, content_hash TEXT UNIQUE NOT NULL,
    content TEXT NOT NULL, tags TEXT, memory_type TEXT, metadata TEXT,
    created_at REAL, updated_at REAL, created_at_iso TEXT, updated_at_iso TEXT,
    deleted_at REAL DEFAULT NULL, store TEXT DEFAULT 'default', parent_id TEXT,
    version INTEGER DEFAULT 1, confidence REAL DEFAULT 1.0, last_accessed INTEGER,
    superseded_by TEXT, embedding_pending INTEGER NOT NULL DEFAULT 0);
CREATE INDEX idx_content_hash ON memories(content_hash);
CREATE INDEX idx_created_at ON memories(created_at);
CREATE INDEX idx_memory_type ON memories(memory_type);
CREATE INDEX idx_deleted_at ON memories(deleted_at);
CREATE INDEX idx_memories_embedding_pending ON memories(embedding_pending);
CREATE VIRTUAL TABLE memory_content_fts USING fts5(
    content, content='memories', content_rowid='id', tokenize='trigram');
CREATE TRIGGER memories_fts_ai AFTER INSERT ON memories BEGIN
    INSERT INTO memory_content_fts(rowid, content) VALUES (new.id, new.content); END;
CREATE TRIGGER memories_fts_au AFTER UPDATE ON memories BEGIN
    DELETE FROM memory_content_fts WHERE rowid = old.id;
    INSERT INTO memory_content_fts(rowid, content) VALUES (new.id, new.content); END;
CREATE TRIGGER memories_fts_ad AFTER DELETE ON memories BEGIN
    DELETE FROM memory_content_fts WHERE rowid = old.id; END;
"""


class UnreadablePlan(namedtuple("UnreadablePlan", "reason")):
    """The content of a plan memory that is JSON bridge will not take (load_json); reason
    says why, and check_plan reports it."""

    __slots__ = ()


# bridge's one table in the memory server's file: a plan's state, keyed by the plan
# memory's content_hash (which never changes). The server's write-backs, tools and HTTP
# API touch only their own tables, so nothing there undoes a claim or a finish; its
# migrations and `memory check-db` ignore this one (12.2.0, 12.4.0: tests/test_real_server.py).
STATE_TABLE = "bridge_plan_state"
STATE_COLUMNS = ("status", "plan_id", "run_id", "claimed_at", "heartbeat_at", "owner_host",
                 "owner_pid", "finished_at", "error", "result_hash", "resumed_from")
STATE_DDL = f"""
CREATE TABLE IF NOT EXISTS {STATE_TABLE} (
    content_hash TEXT PRIMARY KEY,     -- the plan memory's (computed on the original layout)
    status TEXT NOT NULL,              -- one of PLAN_STATUSES
    plan_id TEXT, run_id TEXT, claimed_at TEXT, heartbeat_at TEXT,
    owner_host TEXT, owner_pid INTEGER,
    finished_at TEXT, error TEXT,
    result_hash TEXT,                  -- the run's result memory; set before an HTTP store
    resumed_from TEXT,
    extra TEXT,                        -- any other field of the state, as a JSON object
    updated_at TEXT NOT NULL)
"""
# Tags of the rows the server's consolidation makes, never plans even with a plan's tags
# (mcp-memory-service consolidation/compression.py, consolidator.py).
CONSOLIDATION_TAGS = frozenset({"cluster", "compressed", "association"})
SPLIT_PLAN_PROBLEM = ("plan split into {chunks} chunks by the memory server (its 800-character "
                      "limit: MCP_HYBRID_MAX_CONTENT_LENGTH, MCP_SQLITEVEC_MAX_CONTENT_LENGTH): "
                      "store it with bridge --submit")


def _summary_text(value: Any, max_chars: int) -> str:
    """Return value as one line of at most max_chars characters, controls made spaces."""
    text = " ".join(re.sub(r"[\x00-\x1f\x7f-\x9f]", " ", str(value or "")).split())
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


class ResultMemory(namedtuple("ResultMemory", "content tags metadata conversation_id state")):
    """A result memory as Store.finish stores it: content, tags (list of str), metadata
    (dict), conversation_id (the run id, for the HTTP API) and state, the plan's final
    {"status", "finished_at", "error"}."""

    __slots__ = ()


def parse_result_content(content: str) -> dict | None:
    """Return the result document of a result memory's content (the JSON of its last line,
    or of the whole, as older results hold), or None when it is not one: an object whose
    "type" is "bridge_result"."""
    for text in (content.rpartition("\n")[2], content):
        try:
            document = load_json(text)
        except ValueError:
            continue
        if isinstance(document, dict) and document.get("type") == "bridge_result":
            return document
    return None


###############################################################################
# 9. The memory server's HTTP API
#
# `memory server --http`, for result memories the server embeds itself. Source:
# mcp-memory-service web/api/memories.py and health.py, checked against 12.4.0
# (tests/test_real_server.py): POST /api/memories {content, tags, memory_type, metadata,
# conversation_id} -> {success, message, content_hash}; GET /api/health needs no key,
# GET /api/health/detailed does (401).
###############################################################################


MEMORY_API_TIMEOUT_S = 30.0            # an embedding on a CPU: under a second; a load longer
MEMORY_API_MAX_BODY_BYTES = 1_000_000  # the server refuses bodies over 1 MiB
MEMORY_API_MAX_REPLY_BYTES = 65_536    # an answer longer than this is not the API's
# A request ends this many seconds after it was sent, however the server trickles its
# answer (timeout_s is per read): for a first store that loads the embedding model.
MEMORY_API_DEADLINE_S = 120.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_memory_url(url: str) -> str:
    """Return the memory server's base URL (no trailing slash) when it is an http URL on
    this machine (LOOPBACK_HOSTS: the key goes with every request); else raise
    ConfigError."""
    # urlsplit drops \r, \n and \t silently; httpx then refuses the URL mid-run
    if re.search(r"[\x00-\x20\x7f-\x9f]", url):
        raise ConfigError(f"memory URL {url!r} holds a control character or a space",
                          "pass the URL alone, e.g. --memory-url http://127.0.0.1:8000 "
                          "(check the variable's line ending)")
    try:
        parts = urlsplit(url)
        parts.port          # raises ValueError on a port that is not a number in range
    except ValueError:
        parts = None
    if parts is None or parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS \
            or parts.query or parts.username is not None:
        raise ConfigError(f"memory URL {url!r} is not an http URL on this machine",
                          "pass e.g. --memory-url http://127.0.0.1:8000 (127.0.0.1, localhost "
                          "or [::1])")
    return url.rstrip("/")


HOOKS_CONFIG_SHOWN = "~/.claude/hooks/config.json"
HOOKS_CONFIG_MAX_BYTES = 1_000_000


def hooks_memory_endpoint(home: Path) -> tuple[str | None, str | None, str | None]:
    """Return (url, api_key, note) from the memory server's Claude Code hooks' settings,
    home/.claude/hooks/config.json: memoryService.http.endpoint and .apiKey, else the
    older template's memoryService.endpoint and .apiKey. url: check_memory_url's form, or
    None, when note says why if the file exists. Never raises. Source: mcp-memory-service
    claude-hooks/config.json, config.template.json, scripts/ensure-server.js."""
    path = home / ".claude" / "hooks" / "config.json"
    try:        # a FIFO there is refused (open_regular), never waited on
        document = read_json_file(path, follow_symlinks=True,
                                  max_bytes=HOOKS_CONFIG_MAX_BYTES)
    except FileNotFoundError:
        return None, None, None
    except OSError as exc:
        return None, None, f"{HOOKS_CONFIG_SHOWN} cannot be read ({exc.strerror or exc})"
    except ValueError:
        document = None
    service = document.get("memoryService") if isinstance(document, dict) else None
    if not isinstance(service, dict):
        return None, None, f"{HOOKS_CONFIG_SHOWN} has no memoryService object"
    http = service.get("http") if isinstance(service.get("http"), dict) else service
    url, key = http.get("endpoint"), http.get("apiKey")
    if not isinstance(url, str) or not url:
        return None, None, f"{HOOKS_CONFIG_SHOWN} names no memoryService.http.endpoint"
    try:
        url = check_memory_url(url)
    except ConfigError:
        return None, None, (f"{HOOKS_CONFIG_SHOWN} names {_summary_text(url, 120)!r}, not an "
                            "http URL on this machine: not used")
    return url, key if isinstance(key, str) and key else None, None


def server_label(value: Any) -> str | None:
    """Return a label the memory server sent (version, backend): a str or number as text
    of at most 80 characters (still to be printed through printable()), else None."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    return clip(str(value), 80, "label")


def _late_answer(deadline_s: float) -> ValueError:
    return ValueError(f"no whole answer within {deadline_s:g} s (MEMORY_API_DEADLINE_S)")


class MemoryAPI:
    """A client of the memory server's HTTP API at url, sending api_key (MCP_API_KEY) as
    X-API-Key. timeout_s: seconds to connect or wait for each piece of an answer;
    deadline_s: seconds the whole request may take (None: MEMORY_API_DEADLINE_S). Answers
    are hostile: at most MEMORY_API_MAX_REPLY_BYTES, by load_reply. Never raises: every
    failure is a reason string."""

    def __init__(self, url: str, api_key: str | None, timeout_s: float = MEMORY_API_TIMEOUT_S,
                 deadline_s: float | None = None):
        import httpx

        self.url, self.api_key, self.timeout_s = url, api_key, timeout_s
        self.deadline_s, self._httpx = deadline_s, httpx
        self._failures = (httpx.HTTPError, httpx.InvalidURL, ValueError)

    def _request(self, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
        """Return (HTTP status, parsed JSON or None) within the request's deadline, in a
        daemon thread, so a server trickling its headers cannot hold bridge past it. Raises
        httpx.HTTPError, httpx.InvalidURL or ValueError (an answer too long or too late)."""
        deadline_s = MEMORY_API_DEADLINE_S if self.deadline_s is None else self.deadline_s
        deadline = time.monotonic() + deadline_s
        outcome: list[Any] = []

        def attempt() -> None:
            try:
                outcome.append(self._exchange(method, path, body, deadline, deadline_s))
            except Exception as exc:    # handed to the caller's thread, raised there
                outcome.append(exc)

        worker = threading.Thread(target=attempt, name="memory-api", daemon=True)
        worker.start()
        worker.join(deadline_s)
        if not outcome:     # the worker stops by itself at the next piece or timeout_s
            raise _late_answer(deadline_s)
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        return outcome[0]

    def _exchange(self, method: str, path: str, body: dict | None, deadline: float,
                  deadline_s: float) -> tuple[int, Any]:
        headers = {"X-API-Key": self.api_key} if self.api_key else {}
        with self._httpx.Client(timeout=self.timeout_s, trust_env=False) as client:
            with client.stream(method, self.url + path, json=body, headers=headers) as response:
                raw = b""
                for piece in response.iter_bytes():
                    raw += piece
                    if len(raw) > MEMORY_API_MAX_REPLY_BYTES:
                        raise ValueError(f"an answer over {MEMORY_API_MAX_REPLY_BYTES} bytes")
                    if time.monotonic() > deadline:
                        raise _late_answer(deadline_s)
        try:
            return response.status_code, load_reply(raw)
        except ValueError:      # not JSON, NaN, or nested past MAX_JSON_DEPTH
            return response.status_code, None

    def store(self, content: str, tags: list[str], memory_type: str, metadata: dict,
              conversation_id: str) -> tuple[str | None, str | None]:
        """POST one memory; return (its content_hash, None), else (None, why not).
        conversation_id (the run id) keeps the server's 24-hour near-duplicate check from
        refusing a rerun's result."""
        body = {"content": content, "tags": tags, "memory_type": memory_type,
                "metadata": metadata, "conversation_id": conversation_id}
        size = len(json.dumps(body).encode("utf-8"))
        if size > MEMORY_API_MAX_BODY_BYTES:
            return None, (f"the result is {size} bytes, over the server's limit of "
                          f"{MEMORY_API_MAX_BODY_BYTES}")
        try:
            status, reply = self._request("POST", "/api/memories", body)
        except self._failures as exc:
            return None, f"cannot reach it: {_summary_text(exc, 200) or type(exc).__name__}"
        digest = reply.get("content_hash") if isinstance(reply, dict) else None
        if status == 200 and isinstance(reply, dict) and reply.get("success") is True \
                and isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest):
            return digest, None
        if status in (401, 403):
            return None, f"HTTP {status}: it refused the key (MCP_API_KEY)"
        message = reply.get("message") or reply.get("detail") if isinstance(reply, dict) else None
        return None, f"HTTP {status}" + (f": {_summary_text(message, 200)}" if message else "")

    def probe(self) -> dict:
        """Return {"url", "reachable", "key_accepted", "version", "backend", "error"} from
        GET /api/health and /api/health/detailed."""
        report: dict[str, Any] = {"url": self.url, "reachable": False, "key_accepted": None,
                                  "version": None, "backend": None, "error": None}
        try:
            status, _ = self._request("GET", "/api/health")
            report["reachable"] = status == 200
            detail_status, detail = self._request("GET", "/api/health/detailed")
        except self._failures as exc:
            why = _summary_text(exc, 200) or type(exc).__name__
            report["error"] = f"cannot reach {self.url}: {why}"
            return report
        if not report["reachable"]:
            report["error"] = f"{self.url}/api/health answered HTTP {status}"
            return report
        report["key_accepted"] = detail_status == 200
        if detail_status in (401, 403):
            unset = "" if self.api_key else " is not set"
            report["error"] = f"the server refused the key (MCP_API_KEY{unset})"
        elif isinstance(detail, dict):
            storage = detail.get("storage") if isinstance(detail.get("storage"), dict) else {}
            report.update(version=server_label(detail.get("version")),
                          backend=server_label(storage.get("backend")))
        return report


###############################################################################
# 10. Store (SQLite)
# Short transactions on someone else's file: opening it, writing a memory the way the
# memory server does, its health.
###############################################################################


READ_ONLY_STORE_HINT = ("the file or its folder is read-only (a read-only mount, chattr +i, or "
                        "permissions): make both writable for this user, or point --db at a store "
                        "that can be written; nothing is wrong with its content")


def store_locked_error(path: Path, waited_s: float | None = None) -> StoreError:
    """The error of a store another process kept locked for waited_s seconds (None:
    STORE_BUSY_TIMEOUT_S)."""
    waited_s = STORE_BUSY_TIMEOUT_S if waited_s is None else waited_s
    return StoreError(f"the store {path} stayed locked for {waited_s:g} s "
                      "(another process holds it)",
                      "retry when that process is done: the memory server's own writes end in "
                      "seconds; a program holding it longer (an open sqlite3 shell) must let it go")


def _busy(exc: Exception) -> bool:
    """Whether an sqlite3 error says another process holds the store."""
    return "locked" in str(exc) or "busy" in str(exc)


def _write_error(path: Path, exc: Exception) -> StoreError:
    return StoreError(f"cannot write the store {path}: {exc}",
                      READ_ONLY_STORE_HINT if "readonly" in str(exc) else None)


def sqlite3_module() -> Any:
    """Return the sqlite3 module, imported at its first use (bridge --help must not load
    it): the store rooms' one import of it."""
    import sqlite3

    return sqlite3


class StoreFile:
    """The memory server's SQLite file: its layout (of _LAYOUT_COLUMNS; None for any
    other, which open refuses), write transactions, memories written the way the server
    does, its health. bridge uses its subclass Store: `with Store.open(config) as s:`."""

    def __init__(self, conn: sqlite3.Connection, path: Path, crash_at: str | None = None):
        """Read the file's layout from conn. Raises sqlite3.Error when it cannot be read."""
        self.conn, self.path, self.crash_at = conn, path, crash_at
        self.sqlite3 = sqlite3_module()
        self.columns = {row[1] for row in conn.execute("PRAGMA table_info(memories)")}
        self.layout = next((name for name, needed in _LAYOUT_COLUMNS.items()
                            if needed <= self.columns), None)
        # only the memory server's trigram index finds a substring of the marker
        fts = conn.execute("SELECT sql FROM sqlite_master "
                           "WHERE name = 'memory_content_fts'").fetchone()
        self.has_fts = fts is not None and "trigram" in (fts[0] or "") \
            and self.layout != LAYOUT_ORIGINAL

    @classmethod
    def open(cls, config: Config) -> "Store":
        """Open the first existing store of config.db_paths, writing nothing (STATE_TABLE
        comes with the first state recorded). Raises StoreError when none exists (naming
        every path tried), or the file is not SQLite or of a layout bridge does not know."""
        sqlite3 = sqlite3_module()
        path = next((p for p in config.db_paths if p.is_file()), None)
        if path is None:
            tried = ", ".join(str(p) for p in config.db_paths)
            raise StoreError(f"no memory store found (tried {tried})",
                             "pass --db PATH or set BRIDGE_DB to the memory server's "
                             "sqlite_vec.db; to start an empty store: bridge --submit PLAN.json "
                             "--db NEWFILE")
        try:
            conn = sqlite3.connect(path, timeout=STORE_BUSY_TIMEOUT_S, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(STORE_BUSY_TIMEOUT_S * 1000)}")
            store = cls(conn, path, config.crash_at)
        except sqlite3.Error as exc:
            if _busy(exc):
                raise store_locked_error(path) from exc
            raise StoreError(f"cannot read the store {path}: {exc}",
                             "check that it is the memory server's SQLite file") from exc
        if store.layout is None:
            conn.close()
            shown = ", ".join(sorted(store.columns)) or "no memories table"
            raise StoreError(f"unsupported store layout in {path} ({shown})",
                             "bridge reads mcp-memory-service 10.x/12.x stores and the original "
                             "bridge layout")
        return store

    @staticmethod
    def create(path: Path) -> None:
        """Create an empty store at path in the memory server's 12.x layout. Raises
        StoreError when path exists, its folder does not, or it cannot be written."""
        sqlite3 = sqlite3_module()
        if path.exists():
            raise StoreError(f"cannot create a store at {path}: the file exists")
        if not path.parent.is_dir():       # a typo in --db must not make folders and a store
            raise StoreError(f"cannot create a store at {path}: folder {path.parent} does not "
                             "exist", "check --db for a typo; to start a store there, make the "
                             "folder first")
        try:
            conn = sqlite3.connect(path)
            try:
                conn.executescript(STORE_DDL_12)
            finally:
                conn.close()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot create a store at {path}: {exc}") from exc

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()

    def _has_table(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                 (name,)).fetchone() is not None

    def _or_null(self, column: str) -> str:
        """column (as "name" or "alias.name") when the layout has it, else NULL."""
        return column if column.rpartition(".")[2] in self.columns else "NULL"

    def _live_filter(self, alias: str = "m") -> str:
        clauses = []
        if "deleted_at" in self.columns:
            clauses.append(f"{alias}.deleted_at IS NULL")
        if "superseded_by" in self.columns:
            clauses.append(f"{alias}.superseded_by IS NULL")
        return " AND ".join(clauses) or "1"

    def _write(self, work: Callable[[], Any]) -> Any:
        """Run work() inside BEGIN IMMEDIATE … COMMIT, retrying while the file is busy."""
        for attempt in range(1, STORE_WRITE_TRIES + 1):
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except self.sqlite3.OperationalError as exc:
                if not _busy(exc):
                    raise _write_error(self.path, exc) from exc
                if attempt < STORE_WRITE_TRIES:
                    time.sleep(0.05 * attempt)
                    continue
                waited_s = STORE_WRITE_TRIES * STORE_BUSY_TIMEOUT_S
                raise store_locked_error(self.path, waited_s) from exc
            try:
                result = work()
                self.conn.execute("COMMIT")
                return result
            except BaseException as exc:
                self.conn.execute("ROLLBACK")
                if isinstance(exc, self.sqlite3.Error):
                    raise _write_error(self.path, exc) from exc
                raise

    def insert_memory(self, content: str, tags: list[str], memory_type: str,
                      metadata: dict) -> str:
        """Insert one memory the way the memory server does (no embedding: tag and keyword
        search find it, semantic search does not); return its content_hash. Call inside
        _write. Raises StoreError when identical content is already stored."""
        now = time.time()
        digest = content_hash(content)
        tags_text = ",".join(tag_safe(t.strip()) for t in tags)
        if self.layout == LAYOUT_ORIGINAL:
            values = {"id": os.urandom(16).hex(), "content": content,
                      "created_at": iso_from_ts(now),
                      "metadata": json.dumps({**metadata, "tags": tags, "type": memory_type})}
        else:
            values = {"content_hash": digest, "content": content, "tags": tags_text,
                      "memory_type": memory_type, "metadata": json.dumps(metadata),
                      "created_at": now, "updated_at": now, "created_at_iso": iso_from_ts(now),
                      "updated_at_iso": iso_from_ts(now), "store": "default",
                      "embedding_pending": 0}
            values = {k: v for k, v in values.items() if k in self.columns}
        sql = (f"INSERT INTO memories ({', '.join(values)}) "
               f"VALUES ({', '.join('?' for _ in values)})")
        try:
            self.conn.execute(sql, tuple(values.values()))
        except self.sqlite3.IntegrityError as exc:
            if "content_hash" not in str(exc):
                raise StoreError(f"cannot insert into {self.path}: {exc}") from exc
            raise StoreError(f"the store already holds a memory with content hash "
                             f"{digest[:12]}…", "identical content was stored before (perhaps "
                             "soft-deleted)") from exc
        return digest

    def soft_delete(self, row_id: Any) -> None:
        """Mark one memory deleted the way the memory server does. Call inside _write.
        Raises StoreError on a layout without deleted_at."""
        if "deleted_at" not in self.columns:
            raise StoreError(f"the store {self.path} ({self.layout} layout) has no soft delete",
                             "delete the old plan by hand, then submit again")
        now = time.time()
        self.conn.execute("UPDATE memories SET deleted_at = ?, updated_at = ?, updated_at_iso = ? "
                          "WHERE id = ?", (now, now, iso_from_ts(now), row_id))

    def _has_live_hash(self, digest: str) -> bool:
        if "content_hash" not in self.columns:
            return False
        return self.conn.execute(f"SELECT 1 FROM memories m WHERE content_hash = ? "
                                 f"AND {self._live_filter()}", (digest,)).fetchone() is not None

    def check_usable(self) -> str | None:
        """Return why a run could not use this store, or None: PRAGMA quick_check
        (https://sqlite.org/pragma.html#pragma_quick_check: "ok", else the problems), then
        a probe table created and rolled back, so the file is never changed (a read-only
        mount fails here). A store busy with another writer counts as writable."""
        try:
            found = [row[0] for row in self.conn.execute("PRAGMA quick_check(5)")]
        except self.sqlite3.DatabaseError as exc:
            return f"PRAGMA quick_check failed: {exc}"
        if found != ["ok"]:
            return "PRAGMA quick_check found: " + " ".join("; ".join(map(str, found)).split())
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except self.sqlite3.OperationalError as exc:
            return None if _busy(exc) else f"cannot write: {exc}"
        try:
            self.conn.execute("CREATE TABLE bridge_write_probe (x)")
        except self.sqlite3.DatabaseError as exc:
            return f"cannot write: {exc}"
        finally:
            self.conn.execute("ROLLBACK")
        return None

    def memory_report(self) -> dict:
        """Return the store as the memory server sees it: {"schema_version" (or None),
        "migrations" (rows of migration_registry, or None), "state_table" (bool),
        "plans_recorded", "bridge_rows" (live rows tagged bridge-plan or bridge-result),
        "without_embedding" (of those, rows missing from the vec0 shadow table
        memory_embeddings_rowids, whose rowid is memories.id; None without it)}."""
        def count(sql: str) -> int:
            return self.conn.execute(sql).fetchone()[0]

        report: dict[str, Any] = {"schema_version": None, "migrations": None,
                                  "state_table": self._has_table(STATE_TABLE), "plans_recorded": 0,
                                  "bridge_rows": 0, "without_embedding": None}
        if self._has_table("metadata"):
            row = self.conn.execute("SELECT value FROM metadata "
                                    "WHERE key = 'schema_version'").fetchone()
            report["schema_version"] = row[0] if row else None
        if self._has_table("migration_registry"):
            report["migrations"] = count("SELECT COUNT(*) FROM migration_registry")
        if report["state_table"]:
            report["plans_recorded"] = count(f"SELECT COUNT(*) FROM {STATE_TABLE}")
        if "tags" not in self.columns:
            return report
        ours = (f"FROM memories m WHERE {self._live_filter()} AND "
                f"((',' || m.tags || ',') LIKE '%,{PLAN_TAG},%' "
                f"OR (',' || m.tags || ',') LIKE '%,{RESULT_TAG},%')")
        report["bridge_rows"] = count(f"SELECT COUNT(*) {ours}")
        if self._has_table("memory_embeddings_rowids"):
            report["without_embedding"] = count(f"SELECT COUNT(*) {ours} AND m.id NOT IN "
                                                "(SELECT rowid FROM memory_embeddings_rowids)")
        return report


###############################################################################
# 11. Store: plan states and claims
# The plan record and its effective status, STATE_TABLE read and written (and migrated
# from an older bridge's metadata), claim, heartbeat, release, cancel, and a run that died
# after storing its result settled by that result.
###############################################################################


class PlanRecord(namedtuple("PlanRecord", "row_id content plan metadata created_at tags digest "
                            "saved", defaults=("", None, None))):
    """One plan memory as read from the store. row_id: memories.id (an int; a str in the
    original layout). content, tags: the row's text. plan: the parsed content (a dict, else
    reported as invalid). metadata: the row's object (never read for state). created_at:
    Unix seconds (ISO text in the original layout). digest: the row's content_hash (None:
    computed). saved: its STATE_TABLE row as a state dict, or None."""

    __slots__ = ()

    @property
    def content_hash(self) -> str:
        """The plan memory's content_hash: the key of its state."""
        return self.digest or content_hash(self.content)

    @property
    def chunks(self) -> int:
        """How many chunks the memory server split this memory into (metadata's
        total_chunks), else 0."""
        total = self.metadata.get("total_chunks")
        if "chunk_index" in self.metadata and isinstance(total, int) and total > 1:
            return total
        return 0

    @property
    def plan_id(self) -> str:
        """The plan's own id, or "row-N" when its content has none."""
        if isinstance(self.plan, dict) and isinstance(self.plan.get("id"), str):
            return self.plan["id"]
        return f"row-{self.row_id}"

    @property
    def state(self) -> dict:
        """The recorded state, or {}: STATE_COLUMNS' keys, owner {"host", "pid"} and extras."""
        return self.saved if isinstance(self.saved, dict) else {}

    @property
    def owner(self) -> dict:
        """The recorded owner {"host", "pid"} of an in_progress plan, or {}."""
        value = self.state.get("owner")
        return value if isinstance(value, dict) else {}

    @property
    def status(self) -> str:
        """The effective status: the recorded state, else the content's status."""
        if self.state.get("status") in PLAN_STATUSES:
            return self.state["status"]
        if isinstance(self.plan, dict) and self.plan.get("status") in PLAN_STATUSES:
            return self.plan["status"]
        return "invalid"

    @property
    def stale(self) -> bool:
        """True when in_progress but its owner is gone: its process no longer runs on this
        host, or its heartbeat is more than STALE_AFTER_S seconds from now, past or future
        (one in year 9999 is a forgery), or there is no heartbeat that reads as a time."""
        if self.status != "in_progress":
            return False
        owner = self.owner
        if owner.get("host") == hostname() and isinstance(owner.get("pid"), int) \
                and not pid_alive(owner["pid"]):
            return True
        try:        # bridge writes UTC with a Z; a bare time is read as UTC
            beat = utc_datetime(str(self.state.get("heartbeat_at")))
            return abs(time.time() - beat.timestamp()) > STALE_AFTER_S
        except (ValueError, OverflowError):     # OverflowError: year 1 with a +23:59 offset
            return True

    @property
    def display_status(self) -> str:
        """The status as shown to users: "stale" for an in_progress plan whose owner died."""
        return "stale" if self.stale else self.status

    @property
    def objective(self) -> str:
        """The plan's one-line objective, or ""."""
        context = self.plan.get("context") if isinstance(self.plan, dict) else None
        objective = context.get("objective") if isinstance(context, dict) else None
        return objective if isinstance(objective, str) else ""

    @property
    def step_count(self) -> int:
        """How many steps the plan lists (0 when it lists none readable)."""
        steps = self.plan.get("steps") if isinstance(self.plan, dict) else None
        return len(steps) if isinstance(steps, list) else 0


class PlanStates(StoreFile):
    """The plans' states in the store (STATE_TABLE) and their claims. Store is the class
    to use."""

    def reload(self, record: PlanRecord) -> PlanRecord:
        """Return record with its state read again (another process may have changed it)."""
        return record._replace(saved=self._settled(self._read_state(record.content_hash)))

    @property
    def has_state_table(self) -> bool:
        """Whether STATE_TABLE exists (asked each time: another bridge may make it)."""
        return self._has_table(STATE_TABLE)

    def _create_state_table(self) -> None:
        """Create STATE_TABLE, filled from the metadata["bridge"] objects an older bridge
        wrote (the migration). Call inside _write: all of it commits with the state."""
        if not self._has_table(STATE_TABLE):      # another process may have made it first
            self.conn.execute(STATE_DDL)
            for digest, state in self._legacy_states().items():
                self._save_state(digest, state.get("plan_id"), state)

    def _legacy_states(self, rows: list[tuple] | None = None) -> dict[str, dict]:
        """Return {content_hash: state} from every row whose metadata holds an older
        bridge's "bridge" object with a known status. rows: (content_hash or None,
        content, metadata) to look at; None: a scan of the store (the migration)."""
        if rows is None:
            sql = (f"SELECT {self._or_null('content_hash')}, content, metadata FROM memories "
                   "WHERE instr(metadata, '\"bridge\"') > 0")
            rows = self.conn.execute(sql).fetchall()
        states = {}
        for digest, content, metadata in rows:
            try:
                old = load_json(metadata).get("bridge")
            except (ValueError, AttributeError):
                continue
            try:
                plan = load_json(content)
            except ValueError:
                plan = None
            if isinstance(old, dict) and old.get("status") in PLAN_STATUSES:
                text = {**old, **{k: old[k] if isinstance(old.get(k), str) else None
                                  for k in STATE_COLUMNS}}
                owner = old.get("owner") if isinstance(old.get("owner"), dict) else {}
                host, pid = owner.get("host"), owner.get("pid")
                text["owner"] = {"host": host if isinstance(host, str) else None,
                                 "pid": pid if isinstance(pid, int) else None}
                plan_id = plan.get("id") if isinstance(plan, dict) else None
                text["plan_id"] = plan_id if isinstance(plan_id, str) else None
                states[digest or content_hash(content)] = text
        return states

    def _states(self, rows: list[tuple] | None = None) -> dict[str, dict]:
        """Return {plan content_hash: state} of every plan recorded (without STATE_TABLE,
        of the rows given)."""
        if not self.has_state_table:
            return self._legacy_states(rows)  # read-only on a store bridge has not used since
        rows = self.conn.execute(f"SELECT content_hash, {', '.join(STATE_COLUMNS)}, extra "
                                 f"FROM {STATE_TABLE}")
        return {row[0]: self._state_of(row[1:]) for row in rows}

    def _read_state(self, digest: str) -> dict | None:
        if not self.has_state_table:
            return self._legacy_states().get(digest)
        row = self.conn.execute(f"SELECT {', '.join(STATE_COLUMNS)}, extra FROM {STATE_TABLE} "
                                "WHERE content_hash = ?", (digest,)).fetchone()
        return self._state_of(row) if row else None

    @staticmethod
    def _state_of(row: tuple) -> dict:
        """A STATE_TABLE row (STATE_COLUMNS, then extra) as a state dict."""
        state = dict(zip(STATE_COLUMNS, row))
        host, pid = state.pop("owner_host"), state.pop("owner_pid")
        state["owner"] = {"host": host, "pid": pid} if host is not None or pid is not None else None
        try:
            extra = load_json(row[len(STATE_COLUMNS)] or "{}")    # a row anyone may have written
        except ValueError:
            extra = {}
        return {**(extra if isinstance(extra, dict) else {}), **state}

    def _settled(self, state: dict | None) -> dict | None:
        """Return state, finished from its result memory when the run stored that result
        (a live one of its run_id, under result_hash) but died before its final
        transaction."""
        if not state or state.get("status") != "in_progress" or not state.get("result_hash") \
                or "content_hash" not in self.columns:
            return state
        row = self.conn.execute(f"SELECT content FROM memories m WHERE content_hash = ? "
                                f"AND {self._live_filter()}", (state["result_hash"],)).fetchone()
        document = parse_result_content(row[0]) if row else None
        if document is None or document.get("run_id") != state.get("run_id") \
                or document.get("status") not in PLAN_STATUSES:
            return state
        return {**state, "status": document["status"], "finished_at": document.get("finished_at"),
                "error": document.get("error")}

    def _save_state(self, digest: str, plan_id: str | None, state: dict) -> None:
        owner = state.get("owner") if isinstance(state.get("owner"), dict) else {}
        values = {**{k: state.get(k) for k in STATE_COLUMNS}, "plan_id": plan_id,
                  "owner_host": owner.get("host"), "owner_pid": owner.get("pid")}
        extra = redact({k: v for k, v in state.items() if k not in STATE_COLUMNS and k != "owner"})
        values = redact(values)         # an error line may quote a model's or a command's words
        self.conn.execute(f"INSERT OR REPLACE INTO {STATE_TABLE} (content_hash, "
                          f"{', '.join(STATE_COLUMNS)}, extra, updated_at) "
                          f"VALUES (?, {', '.join('?' for _ in STATE_COLUMNS)}, ?, ?)",
                          (digest, *values.values(), json.dumps(extra) if extra else None,
                           utc_now_iso()))

    def _set_state(self, record: PlanRecord, changes: dict) -> dict:
        """Merge changes into the plan's row of STATE_TABLE; return the new state. Call
        inside _write."""
        state = {**(self._read_state(record.content_hash) or {}), **changes}
        if not self.has_state_table:
            self._create_state_table()
        self._save_state(record.content_hash, record.plan_id, state)
        return state

    def claim(self, record: PlanRecord, run_id: str, allowed: tuple[str, ...] = ("pending",),
              resumed_from: str | None = None) -> bool:
        """Move a plan to in_progress for this process, atomically. allowed: the display
        statuses that may be claimed; resumed_from: the run id this run takes over.
        Returns False, changing nothing, when the status is not allowed (any more)."""
        def work() -> bool:
            fresh = self.reload(record)
            if fresh.display_status not in allowed:
                return False
            now = utc_now_iso()
            last = fresh.state.get("result_hash") or fresh.state.get("last_result_hash")
            self._set_state(record, {
                "last_result_hash": last if isinstance(last, str) else None,
                "status": "in_progress", "run_id": run_id, "claimed_at": now,
                "heartbeat_at": now, "owner": {"host": hostname(), "pid": os.getpid()},
                "finished_at": None, "error": None, "result_hash": None,
                "resumed_from": resumed_from})
            crash_point(self.crash_at, "claim")
            return True
        return self._write(work)

    def _change_if(self, record: PlanRecord, holds: Callable[[PlanRecord], bool],
                   changes: Callable[[], dict]) -> bool:
        """In one transaction, merge changes() into the plan's state when holds(the record
        read again); return whether it did."""
        def work() -> bool:
            if not holds(self.reload(record)):
                return False
            self._set_state(record, changes())
            return True
        return self._write(work)

    def heartbeat(self, record: PlanRecord, run_id: str) -> bool:
        """Refresh heartbeat_at of a plan this run still owns; False if it does not."""
        return self._change_if(record, lambda fresh: fresh.state.get("run_id") == run_id,
                               lambda: {"heartbeat_at": utc_now_iso()})

    def release(self, record: PlanRecord, run_id: str) -> bool:
        """Put a plan this run claimed back to pending, as if never claimed (a run the
        model server stopped before it did anything); False if the run no longer owns it."""
        return self._change_if(record, lambda fresh: fresh.state.get("run_id") == run_id,
                               lambda: {"status": "pending", "run_id": None, "claimed_at": None,
                                        "heartbeat_at": None, "owner": None,
                                        "resumed_from": None})

    def cancel(self, record: PlanRecord) -> bool:
        """Mark a plan cancelled, atomically, when its display status is in
        CANCELLABLE_STATUSES (the files a stale run left and a review's staged files stay
        as they are); False, changing nothing, when it is running or finished."""
        return self._change_if(
            record, lambda fresh: fresh.display_status in CANCELLABLE_STATUSES,
            lambda: {"status": "cancelled", "finished_at": utc_now_iso(),
                     "error": "cancelled by the user"})

    def replaced_runs(self, record: PlanRecord) -> list[tuple[str, str]]:
        """Return [(run_id, status)] of the last runs of the other contents this plan id
        had (replaced by --submit --replace)."""
        if not self.has_state_table:
            return []
        return self.conn.execute(f"SELECT run_id, status FROM {STATE_TABLE} WHERE plan_id = ? "
                                 "AND content_hash != ? AND run_id IS NOT NULL ORDER BY updated_at",
                                 (record.plan_id, record.content_hash)).fetchall()


###############################################################################
# 12. Store: plan and result memories
# Plan memories found and submitted; a run's result memory stored as the room "The result
# document" built it (directly, or through the memory server's HTTP API for an embedding)
# and found again; what --undo, --apply and --reject record of a run.
###############################################################################


class Store(PlanStates):
    """The doobidoo memory store, for plans, claims and results: `with Store.open(config)
    as store: ...`. Raises StoreError."""

    # The FTS phrase that picks plan candidates: the marker's start. The index is of
    # trigrams, and those of "plan" fill a planner's store, so the whole marker reads far
    # more of it (3.4 ms against 1.6 ms on bench/startup.py's 100,000 memories).
    _FTS_CANDIDATES = "bridge-p"

    def find_plans(self) -> list[PlanRecord]:
        """Return every live plan memory, oldest first: rows holding the schema marker (by
        the server's trigram index, else a scan) whose content is an object with "$schema"
        SCHEMA_ID, and, to be reported as invalid, those tagged bridge-plan or holding JSON
        that is not an object (prose naming the marker is no plan). Raises StoreError."""
        tags = "m.tags" if "tags" in self.columns else "''"
        digest = self._or_null("m.content_hash")
        select = (f"SELECT m.rowid, m.id, m.metadata, m.created_at, {tags}, {digest} "
                  "FROM memories m")
        live = self._live_filter()
        if self.has_fts:        # the index picks the candidates: no row's content is read here
            sql = (f"{select} JOIN memory_content_fts f ON f.rowid = m.id "
                   f"WHERE memory_content_fts MATCH '\"{self._FTS_CANDIDATES}\"' AND {live}")
        else:                   # a scan: SQLite reads each row's content, for the marker
            sql = f"{select} WHERE instr(m.content, '{SCHEMA_ID}') > 0 AND {live}"
        try:
            rows = [self._with_content(*row) for row in
                    self.conn.execute(sql + " ORDER BY m.created_at, m.id").fetchall()]
            rows = [row for row in rows if row[1] is None or SCHEMA_ID in str(row[1])]
            # the old metadata states lie on plan rows only: those just read
            states = self._states([(row[5], row[1] or "", row[2]) for row in rows])
        except self.sqlite3.Error as exc:
            raise StoreError(f"cannot read plans from {self.path}: {exc}") from exc
        records, split = [], set()
        for row in rows:
            record = self._record(row) if row[1] is not None else self._oversized(row)
            if record is None:
                continue
            if record.chunks:       # one report per split plan, whichever chunks hold the marker
                original = str(record.metadata.get("original_hash"))
                if original in split:
                    continue
                split.add(original)
            records.append(record._replace(saved=self._settled(states.get(record.content_hash))))
        return records

    def _with_content(self, rowid: int, row_id: Any, *rest: Any) -> tuple:
        """Return a candidate row as (id, content, metadata, created_at, tags, digest), its
        content read only when at most PLAN_MAX_BYTES (else None, and its size after)."""
        try:
            with self.conn.blobopen("memories", "content", rowid, readonly=True) as blob:
                size = len(blob)
        except self.sqlite3.Error:       # not text (NULL, a number): read it as before
            size = 0
        if size > PLAN_MAX_BYTES:
            return (row_id, None, *rest, size)
        content = self.conn.execute("SELECT content FROM memories WHERE rowid = ?",
                                    (rowid,)).fetchone()
        return (row_id, content[0] if content else "", *rest)

    @staticmethod
    def _oversized(row: tuple) -> PlanRecord | None:
        """The record (invalid, saying its size) of a plan row over PLAN_MAX_BYTES when it
        is tagged bridge-plan; None for an untagged one (any memory naming the marker)."""
        row_id, _, _, created_at, tags, digest, size = row
        names = (tags or "").split(",")
        if PLAN_TAG not in names or CONSOLIDATION_TAGS.intersection(names):
            return None
        reason = (f"the plan is {size:,} bytes, over bridge's limit of {PLAN_MAX_BYTES:,} "
                  "(PLAN_MAX_BYTES); not read")
        # the original layout stores no content_hash: this row's state is keyed by its id
        return PlanRecord(row_id, "", UnreadablePlan(reason), {}, created_at, tags or "",
                          digest or f"row-{row_id}-over-{PLAN_MAX_BYTES}")

    @staticmethod
    def _record(row: tuple) -> PlanRecord | None:
        """The record of a candidate row (_with_content's), or None when it is no plan."""
        row_id, content, metadata, created_at, tags, digest = row
        if CONSOLIDATION_TAGS.intersection((tags or "").split(",")):
            return None     # the server's consolidation made it: never a plan
        try:
            plan = load_json(content)
        except JSONRefused as exc:
            plan = UnreadablePlan(f"the plan {exc}")     # JSON, so reported, never run
        except ValueError:
            plan = None
        is_plan = isinstance(plan, dict) and plan.get("$schema") == SCHEMA_ID
        tagged = PLAN_TAG in (tags or "").split(",")
        if not is_plan and not tagged and (plan is None or isinstance(plan, dict)):
            return None     # a note or result that merely mentions the marker
        try:
            meta = load_json(metadata) if metadata else {}
        except ValueError:
            meta = {}
        return PlanRecord(row_id, content, plan, meta if isinstance(meta, dict) else {},
                          created_at, tags or "", digest)

    def get_plan(self, plan_id: str) -> PlanRecord:
        """Return the one live plan whose id is plan_id. Raises PlanNotFound, or
        StoreError when several live plans share the id."""
        matches = [r for r in self.find_plans() if r.plan_id == plan_id]
        if not matches:
            raise PlanNotFound(f"no plan with id {plan_id!r} in {self.path}",
                               "see the plans with: bridge --list --all")
        if len(matches) > 1:
            rows = ", ".join(str(r.row_id) for r in matches)
            raise StoreError(f"plan id {plan_id!r} is used by {len(matches)} live memories "
                             f"(rows {rows})",
                             "delete all but one of them with the memory server, then run again")
        return matches[0]

    def pending_count(self) -> int:
        """Count the live plans whose effective status is pending."""
        return sum(1 for r in self.find_plans() if r.status == "pending")

    def submit(self, plan: dict, replace: bool = False) -> tuple[str, list]:
        """Store a plan as a new memory the way the memory server's memory_store does;
        with replace, soft-delete the live plans of its id in the same transaction.
        Returns (content_hash, row ids replaced). Raises StoreError when a live plan has
        this id and replace is off, or identical content is already stored."""
        content = json.dumps(plan, ensure_ascii=False, indent=2)

        def work() -> tuple[str, list]:
            same = [r for r in self.find_plans() if r.plan_id == plan.get("id")]
            identical = [r for r in same if r.content_hash == content_hash(content)]
            if identical:       # --replace would fail on the unique content_hash: say what works
                status = identical[0].display_status
                rerun = " --rerun" if status != "pending" else ""
                again = f"bridge --plan {plan.get('id')}{rerun}"
                raise StoreError(f"this very plan {plan.get('id')!r} is already in {self.path} "
                                 f"(row {identical[0].row_id}, {status})",
                                 f"to run it again: {again}; to change it, edit the file and "
                                 "submit it with --replace")
            if same and not replace:
                rows = ", ".join(f"row {r.row_id}, {r.display_status}" for r in same)
                raise StoreError(f"a plan with id {plan.get('id')!r} is already in "
                                 f"{self.path} ({rows})",
                                 "pass --replace to soft-delete it and store this one")
            for record in same:
                self.soft_delete(record.row_id)
            digest = self.insert_memory(content, [PLAN_TAG], PLAN_MEMORY_TYPE, {})
            return digest, [r.row_id for r in same]
        return self._write(work)

    # -- result memories -----------------------------------------------------

    def finish(self, record: PlanRecord, memory: ResultMemory,
               memory_api: MemoryAPI | None = None,
               warn: Callable[[str], None] | None = None) -> str:
        """Store the result memory and record the plan's final state (memory.state, with
        result_hash); return the result's content_hash. Raises StoreError.

        Without memory_api, one transaction. With it: (1) the state records result_hash,
        still in_progress; (2) POST /api/memories; (3) one transaction stores the row
        unless a live row has that hash, and the final state. A crash after (2) leaves a
        result its state points to (_settled); a refusal leaves nothing, so (3) writes it
        and warn() gets one line. Never lost, never stored twice in this file."""
        content, tags, metadata = memory.content, memory.tags, memory.metadata
        digest = content_hash(content)
        why = None
        if memory_api is not None:
            self._write(lambda: self._set_state(record, {"result_hash": digest}))
            stored, why = memory_api.store(content, tags, RESULT_MEMORY_TYPE, metadata,
                                           memory.conversation_id)
            crash_point(self.crash_at, "result_posted")
            if stored is not None and stored != digest:
                why = (f"it stored the result as another memory ({stored[:12]}…: split into "
                       "chunks by its length limit?)")

        def work() -> str:
            if not self._has_live_hash(digest):
                self.insert_memory(content, tags, RESULT_MEMORY_TYPE, metadata)
                if memory_api is not None and warn is not None:
                    reason = why or f"it writes another store file than {self.path}"
                    warn(f"the memory server at {memory_api.url} did not store the result of "
                         f"plan {record.plan_id} ({reason}); stored it directly: tag search "
                         "finds it, semantic search does not")
            self._set_state(record, {**memory.state, "result_hash": digest})
            crash_point(self.crash_at, "finish")
            return digest
        return self._write(work)

    def find_result(self, record: PlanRecord,
                    named_only: bool = True) -> tuple[dict, str] | None:
        """Return (document, content_hash) of the newest result of a plan that its state
        names (result_hash, else last_result_hash: the one before the current claim), or
        None. A memory merely tagged plan:<id> is anyone's (a forgery): with named_only
        False the newest such counts too."""
        rows: list = []
        state = record.state
        named = [h for h in (state.get("result_hash"), state.get("last_result_hash"))
                 if isinstance(h, str) and h]         # the newest first
        digest_column = self._or_null("content_hash")
        for digest in named if "content_hash" in self.columns else ():
            rows += self.conn.execute("SELECT content_hash, content FROM memories "
                                      "WHERE content_hash = ?", (digest,)).fetchall()
        if "tags" in self.columns:
            rows += self.conn.execute(
                f"SELECT {digest_column}, content FROM memories m WHERE (',' || m.tags || ',') "
                f"LIKE ? AND {self._live_filter()} ORDER BY m.created_at DESC",
                (f"%,plan:{tag_safe(record.plan_id)},%",)).fetchall()
        else:
            rows += self.conn.execute(
                f"SELECT {digest_column}, content FROM memories WHERE "
                "instr(content, 'bridge_result') > 0 ORDER BY created_at DESC").fetchall()
        for digest, content in rows:
            document = parse_result_content(content)
            if document is not None and document.get("plan_id") == record.plan_id \
                    and (not named_only or (digest or content_hash(content)) in named):
                return document, content_hash(content)
        return None

    def record_undo(self, record: PlanRecord, run_id: str, undone_at: str) -> None:
        """Record that --undo put back the files of run run_id at undone_at (ISO 8601)."""
        self._write(lambda: self._set_state(record, {"undone_run": run_id,
                                                     "undone_at": undone_at}))

    def record_review(self, record: PlanRecord, run_id: str, expected: str,
                      changes: dict) -> bool:
        """Merge changes into the plan's state if it is still `expected` with run
        run_id (one transaction); False, changing nothing, when it is not."""
        return self._change_if(record, lambda fresh: fresh.state.get("status") == expected
                               and fresh.state.get("run_id") == run_id, lambda: changes)


###############################################################################
# 13. Output validation
#
# What the checks of the room 'Validation types' read an answer with: reasoning taken
# out, fences, JSON, a grounded answer's values. A check returns the artifact: the step's
# output (the code inside a fence when fenced), what later steps see and file_output writes.
###############################################################################

# Patterns as strings: re compiles and caches each on first use, not at start-up.
_FENCE_OPEN = r"^[ \t]*(?P<fence>`{3,}|~{3,})[ \t]*(?P<tag>[A-Za-z0-9_+#.-]*)[^\n]*$"
# after prose on the same line ("Here it is: ```json"), a fence counts only when
# nothing but a tag follows it, so prose that mentions ``` is not a fence
_FENCE_AFTER_TEXT = r"(?P<fence>`{3,}|~{3,})[ \t]*(?P<tag>[A-Za-z0-9_+#.-]*)[ \t]*$"
LANGUAGE_ALIASES = {"python": {"python", "py", "python3"}, "json": {"json", "jsonc", "json5"},
                    "toml": {"toml"}}


# Reasoning a server leaves inside content, by shape: (name, who writes it and the
# source, a string the text must hold for the shape to be tried, where the reasoning
# starts and ends (at the start of the text only), what ends the answer or None).
_HARMONY_FINAL = r"<\|channel\|>final[^<]*(?:<\|constrain\|>[^<]*)?<\|message\|>"
REASONING_SHAPES: tuple[tuple[str, str, str, str, str | None], ...] = (
    # a leading block; an unclosed one swallows the rest
    ("<think>", "many: Qwen3, DeepSeek-R1, QwQ", "<think>",
     r"(?s)^\s*<think>.*?(?:</think>|\Z)\s*", None),
    ("<thinking>", "several fine-tunes", "<thinking>",
     r"(?s)^\s*<thinking>.*?(?:</thinking>|\Z)\s*", None),
    ("[THINK]", "Mistral Magistral", "[THINK]", r"(?s)^\s*\[THINK\].*?(?:\[/THINK\]|\Z)\s*", None),
    ("Gemma 4 thought channel", "Gemma 4: kekzl/imp PR #768", "<|channel>thought",
     r"(?s)^\s*<\|channel>thought.*?(?:<channel\|>|\Z)\s*", None),
    # gpt-oss's Harmony format, unparsed (llama.cpp PR #15181): the answer is the message of
    # the last final channel, up to <|return|> or <|end|>; with no final channel (cut while
    # it analysed) there is no answer
    ("gpt-oss Harmony", "gpt-oss without a Harmony parser: llama.cpp PR #15181", "<|channel|>final",
     rf"(?s)^.*{_HARMONY_FINAL}\s*", r"(?s)\s*<\|(?:return|end|call)\|>.*\Z"),
    ("gpt-oss Harmony, no final channel", "gpt-oss cut while it analysed", "<|channel|>",
     r"(?s)^\s*(?:<\|start\|>assistant)?<\|channel\|>.*\Z", None),
    # the opening tag is in the prompt template, so only the close arrives: reasoning…
    # </think>answer (DeepSeek-R1#352, vllm#13125); to the last close with no open before it
    ("orphan </think>", "DeepSeek-R1 distills, QwQ, Qwen3: DeepSeek-R1#352, vllm#13125",
     "</think>", r"(?s)^(?:(?!<think>).)*</think>\s*", None),
    ("orphan </thinking>", "several fine-tunes", "</thinking>",
     r"(?s)^(?:(?!<thinking>).)*</thinking>\s*", None),
    ("orphan [/THINK]", "Mistral Magistral", "[/THINK]",
     r"(?s)^(?:(?!\[THINK\]).)*\[/THINK\]\s*", None),
)


def split_reasoning(text: str) -> tuple[str, str]:
    """Split a model's content into (answer, reasoning): every REASONING_SHAPES shape at
    the start of the text is taken out, as often as they repeat. A tag inside an answer
    that opened with none stays ("Use the <think> tag")."""
    thought: list[str] = []
    matched = True
    while matched and text:
        matched = False
        for _name, _source, needle, start, end in REASONING_SHAPES:
            found = re.match(start, text) if needle in text else None
            if found and found.group():
                thought.append(found.group())
                text, matched = text[found.end():], True
                if end and (tail := re.search(end, text)):
                    text = text[:tail.start()]
                break
    return text, "".join(thought)


def find_fences(text: str) -> list[tuple[str, str]]:
    """Return every fenced block of text as (language tag lowercased, code). A fence
    (``` or ~~~, three or more) opens at the start of a line or ends a line of prose (then
    only a tag may follow it); it closes at a line of only the same fence, or the end."""
    blocks: list[tuple[str, str]] = []
    lines = text.split("\n")
    n = 0
    while n < len(lines):
        match = re.search(_FENCE_OPEN, lines[n]) or re.search(_FENCE_AFTER_TEXT, lines[n])
        if not match:
            n += 1
            continue
        fence, tag = match["fence"], match["tag"].lower()
        body: list[str] = []
        n += 1
        while n < len(lines) and lines[n].strip() != fence:
            stripped = lines[n].rstrip()
            if stripped.endswith(fence) and not stripped.lstrip().startswith(fence):
                body.append(stripped[: -len(fence)])
                break
            body.append(lines[n])
            n += 1
        blocks.append((tag, "\n".join(body)))
        n += 1
    return blocks


def extract_code(text: str, language: str | None = None) -> str:
    """Return the best fenced block of text (a language's LANGUAGE_ALIASES tag, then an
    untagged one, else the first), or the whole text stripped when it has none."""
    blocks = find_fences(text)
    if not blocks:
        return text.strip()
    if language:
        aliases = LANGUAGE_ALIASES.get(language, {language})
        for wanted in (lambda tag: tag in aliases, lambda tag: tag == ""):
            for tag, code in blocks:
                if wanted(tag):
                    return code
    return blocks[0][1]


def parse_json_output(text: str) -> Any:
    """Parse JSON from a model output: the best fenced block, else the whole, else the
    first JSON value at the first { or [. Raises OutputInvalid naming the first error."""
    candidates = [text.strip()]
    if find_fences(text):
        candidates.insert(0, extract_code(text, "json"))
    first_error = None
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError as exc:
            first_error = first_error or exc
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if starts:
        try:
            return json.JSONDecoder().raw_decode(text, min(starts))[0]
        except ValueError:
            pass
    raise OutputInvalid(f"output is not valid JSON ({first_error})")


def schema_message(error: Any) -> str:
    """A jsonschema error's message on one line, a long offending value given by its size."""
    message, shown = error.message, repr(error.instance)
    if len(shown) > 80:
        value = error.instance
        if isinstance(value, (list, dict, str)):
            kind = {list: "a list of {} items", dict: "an object of {} keys",
                    str: "a string of {} characters"}[type(value)]
            message = message.replace(shown, kind.format(len(value)))
        else:
            message = message.replace(shown, shown[:60] + "…")
    return clip(" ".join(message.split()), 300, "message")


def fold_text(text: str) -> str:
    """Return text as key names and spans are compared: casefolded, whitespace folded."""
    return " ".join(text.casefold().split())


_SPAN_TRIM = ".,;:!?\"'`()[]{}<>*"    # punctuation a word of the input may carry at its ends


def written_numbers(text: str) -> dict[float, int | float]:
    """Return the numbers written in text as words of their own (_SPAN_TRIM trimmed:
    "19.90," "-3") as {value: the JSON number, an int when written without a point}; not
    the digits of a date, a time or a code ("2026-05-14", "09:10", "A-1001")."""
    trim = f"[{re.escape(_SPAN_TRIM)}]*"
    found: dict[float, int | float] = {}
    for match in re.finditer(rf"(?<!\S){trim}(-?\d+(?:\.\d+)?){trim}(?!\S)", text):
        value = float(match[1])
        found.setdefault(value, int(match[1]) if "." not in match[1] else value)
    return found


def _occurs(value: str, source: str) -> bool:
    """Tell whether a string value occurs in source, case and whitespace folded, not
    inside a longer word or number ("Ada" is not in "Adam", "21" is not in "21.5")."""
    words = value.split()
    if not words:
        return True
    pattern = r"\s+".join(map(re.escape, words))
    if re.match(r"\w", words[0]):
        pattern = r"(?<!\w)" + pattern
    if re.search(r"\w$", words[-1]):
        pattern += r"(?!\w|[.,]\d)"
    return re.search(pattern, source, re.IGNORECASE) is not None


def ungrounded_values(value: Any, source: str, path: str = "$") -> list[tuple[str, Any]]:
    """Return (JSON path, value) of every value of a JSON answer, at any depth, in
    document order, that is not in source: a string (_occurs), a number (written_numbers:
    19.9 is "19.90"). Key names, null, booleans and empty strings are exempt."""
    numbers = written_numbers(source)
    found: list[tuple[str, Any]] = []

    def visit(item: Any, where: str) -> None:
        if isinstance(item, dict):
            for key, child in item.items():
                visit(child, f"{where}.{key}" if re.fullmatch(r"[A-Za-z_]\w*", key)
                      else f"{where}[{json.dumps(key, ensure_ascii=False)}]")
        elif isinstance(item, list):
            for n, child in enumerate(item):
                visit(child, f"{where}[{n}]")
        elif isinstance(item, bool) or item is None:
            return
        elif isinstance(item, (int, float)):
            if float(item) not in numbers:
                found.append((where, item))
        elif isinstance(item, str) and not _occurs(item, source):
            found.append((where, item))

    visit(value, path)
    return found


def check_grounded(value: Any, source: str) -> None:
    """Raise OutputInvalid naming (at most five of) the ungrounded_values of a JSON answer
    in the step's input, telling the model to copy each value exactly from the text."""
    missing = ungrounded_values(value, source)
    if missing:
        named = "; ".join(f"{where} = {clip(json.dumps(item, ensure_ascii=False), 80, 'value')}"
                          for where, item in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise OutputInvalid(f"not in the text: {named}{more}. Copy each value exactly from the "
                            "text (use null where the text has none)")


###############################################################################
# 14. Constrained JSON and degenerate output
###############################################################################

# Bounds added to the schema sent for constrained decoding (bounded_schema) where the
# plan sets none; the check still uses the plan's own. A value copied from a sentence is
# a few words; SmolLM2 was seen filling 200 characters of junk into one (60 tokens, 10 s).
JSON_VALUE_MAX_LENGTH = 80      # characters of a string value
JSON_LIST_MAX_ITEMS = 16        # items of a list value
# A grounded step's schema sent may restrict its string values to spans of the step's
# input (span_candidates): runs of up to GROUNDED_SPAN_WORDS words, when there are at most
# GROUNDED_MAX_SPANS of them; a longer input gets the usual schema and only the check.
# 1000 spans are about 170 words of input; on llama-cpp-python 0.3.36 (SmolLM2-135M,
# 2 cores) 975 spans cost 0.8 s more a request than the usual schema, 2,023 spans 1.7 s,
# 4,060 4.7 s.
GROUNDED_SPAN_WORDS = 6         # words of a span: a name, an address, "Guido van Rossum"
GROUNDED_MAX_SPANS = 1000
# Degenerate output, stopped while it streams (DegenerationGuard); each limit sits far
# above a sound answer. PEP 8 and Markdown never need more than 3 newlines in a row, nor
# llama.cpp's JSON grammar more than 2 newlines or 20 spaces. 40 words repeated are ~60
# tokens (2 s on a small CPU); a list of 40 equal literals is the rare sound case it stops.
DEGENERATE_NEWLINES = 8         # newlines in one run of whitespace
DEGENERATE_WHITESPACE = 160     # characters in one run: 3x the indentation of 12 levels of 4
DEGENERATE_REPEAT_WORDS = 40    # a unit of words repeated in a row over at least this many words
DEGENERATE_REPEATS = 4          # ...and at least this many times
DEGENERATE_MAX_PERIOD = 24      # the longest repeating unit looked for, in words (a line of code)


def span_candidates(pieces: list[str]) -> list[str] | None:
    """Return the spans a grounded answer's string values may be, each once, in the order
    they end in the input (shorter first): every run of 1 to GROUNDED_SPAN_WORDS words of
    one piece, end punctuation trimmed, as bounded_string allows. None past
    GROUNDED_MAX_SPANS words or spans: a server's grammar grows with its enum (README,
    Answers grounded in the text)."""
    seen: dict[str, None] = {}
    read = 0
    for piece in pieces:
        words: list[str] = []          # the last GROUNDED_SPAN_WORDS words; each span ends at one
        for match in re.finditer(r"\S+", piece):
            read += 1
            if read > GROUNDED_MAX_SPANS:
                return None
            words = [*words[max(0, len(words) - GROUNDED_SPAN_WORDS + 1):], match[0]]
            for start in range(len(words) - 1, -1, -1):
                span = " ".join(words[start:]).strip(_SPAN_TRIM)
                if span and len(span) <= JSON_VALUE_MAX_LENGTH and \
                        not re.search(r'["\\\x00-\x1f]', span):
                    seen[span] = None
                    if len(seen) > GROUNDED_MAX_SPANS:
                        return None
    return list(seen)


def grounded_spans(validation: dict, source: str | list[str]) -> tuple[list[str], list] | None:
    """Return (span_candidates, the input's written_numbers) for a grounded validation
    whose input has few enough spans, else None (the usual schema is sent). The answer's
    key names (keys, a schema's property names; casefolded) are no spans: SmolLM2 answered
    "unit": "quantity" from a prompt listing both keys. The check still takes them."""
    if not validation.get("grounded"):
        return None
    pieces = [source] if isinstance(source, str) else source
    spans = span_candidates(pieces)
    names = {fold_text(name) for name in
             validation.get("keys") or _property_names(validation.get("schema"))}
    spans = [span for span in spans or [] if fold_text(span) not in names]
    if not spans:
        return None
    numbers: dict[float, int | float] = {}
    for text in pieces:
        for value, number in written_numbers(text).items():
            numbers.setdefault(value, number)
    return spans, list(numbers.values())


def _property_names(schema: Any) -> set[str]:
    """The property names a JSON Schema lists, at any depth."""
    if isinstance(schema, list):
        return {name for item in schema for name in _property_names(item)}
    if not isinstance(schema, dict):
        return set()
    names = set(schema["properties"]) if isinstance(schema.get("properties"), dict) else set()
    return names.union(*(_property_names(child) for key, child in schema.items()
                         if key not in ("enum", "const")))


def span_schema(schema: Any, spans: list[str], numbers: list) -> Any:
    """Return a sent schema (output_schema) with every bounded_string made one of spans
    and every open number one of numbers, through "$defs" "bridge_span" and
    "bridge_number" (llama.cpp's and llama-cpp-python's converters make a $ref to
    "#/$defs/…" one grammar rule: llama_cpp/llama_grammar.py resolve_refs). What the plan
    bounds itself is kept. A number alternative of anyOf or oneOf is dropped where the
    input writes no number (SmolLM2 answered "version": 4.23 for "4.23.0")."""
    def open_number(node: Any) -> bool:
        return isinstance(node, dict) and set(node) == {"type"} and \
            node["type"] in ("number", "integer")

    def swap(node: Any) -> Any:
        if isinstance(node, list):
            return [swap(item) for item in node]
        if not isinstance(node, dict):
            return node
        if node.get("type") == "string" and node.get("pattern") == bounded_string(
                node.get("minLength", 1), node.get("maxLength", JSON_VALUE_MAX_LENGTH))["pattern"]:
            return {"$ref": "#/$defs/bridge_span"}
        if node.get("type") in ("number", "integer") and numbers and not (
                {"enum", "const", "minimum", "maximum", "multipleOf"} & set(node)):
            if node["type"] == "number":
                return {"$ref": "#/$defs/bridge_number"}
            integers = [n for n in numbers if isinstance(n, int)]
            return {"enum": integers} if integers else node
        out = {}
        for key, child in node.items():
            if key in _SCHEMA_MAPS and isinstance(child, dict):
                out[key] = {name: swap(sub) for name, sub in child.items()}
            elif key in ("enum", "const", "required"):
                out[key] = child
            elif key in ("anyOf", "oneOf") and isinstance(child, list):
                alternatives = [swap(sub) for sub in child]
                out[key] = [sub for sub in alternatives if not open_number(sub)] or alternatives
            else:
                out[key] = swap(child)
        return out

    out = swap(schema)
    defs = {**(out.get("$defs") or {}), "bridge_span": {"enum": spans}}
    if numbers:
        defs["bridge_number"] = {"enum": numbers}
    return {**out, "$defs": defs}


def bounded_string(min_length: int = 1, max_length: int = JSON_VALUE_MAX_LENGTH) -> dict:
    """Return the schema of a string of min_length to max_length characters, none a quote,
    backslash or control character: the pattern says so, as llama-cpp-python's grammar
    lets raw newlines into strings (its "char" rule is [^"\\], llama_cpp/llama_grammar.py)
    and its converter, like llama.cpp's, takes the pattern before maxLength. No empty
    string: a small model fills "" where the sentence has the value (null stays allowed)."""
    return {"type": "string", "minLength": min_length, "maxLength": max_length,
            "pattern": '^[^"\\\\\\x00-\\x1F]{%d,%d}$' % (min_length, max_length)}


def bounded_value() -> dict:
    """Return the schema of a value a plan leaves open: a bounded_string, number, boolean,
    null, or a list of at most JSON_LIST_MAX_ITEMS of those. anyOf, not a type list:
    llama.cpp's and llama-cpp-python's converters drop maxLength from a type list
    (llama_cpp/llama_grammar.py visit)."""
    scalars = [bounded_string(), {"type": "number"}, {"type": "boolean"}, {"type": "null"}]
    return {"anyOf": [*scalars, {"type": "array", "items": {"anyOf": scalars},
                                 "maxItems": JSON_LIST_MAX_ITEMS}]}


_SCHEMA_CHILDREN = ("items", "additionalProperties", "not", "if", "then", "else")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def bounded_schema(schema: Any) -> Any:
    """Return a copy of a plan's JSON Schema with bounds where it sets none: a
    bounded_string for a string it leaves unbounded, maxItems JSON_LIST_MAX_ITEMS,
    additionalProperties false on objects listing properties, a bounded_value for an open
    value ({} or an array without items)."""
    if not isinstance(schema, dict):
        return schema
    if _is_open(schema):
        return bounded_value()
    out = dict(schema)
    for key in _SCHEMA_CHILDREN:
        if isinstance(out.get(key), dict):
            out[key] = bounded_schema(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [bounded_schema(s) for s in out[key]]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: bounded_schema(s) for name, s in out[key].items()}
    types = out.get("type") if isinstance(out.get("type"), list) else [out.get("type")]
    shortest = out.get("minLength", 1)
    if types == ["string"] and isinstance(shortest, int) and shortest <= JSON_VALUE_MAX_LENGTH and \
            not any(k in out for k in ("maxLength", "enum", "const", "format", "pattern")):
        out.update(bounded_string(shortest))
    if "array" in types:
        out.setdefault("maxItems", JSON_LIST_MAX_ITEMS)
        if "items" not in out and "prefixItems" not in out:
            out["items"] = bounded_value()["anyOf"][-1]["items"]
    if "object" in types and "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


def _is_open(schema: dict) -> bool:
    """Tell whether a schema says nothing about its value ({} or only annotations)."""
    annotations = {"title", "description", "default", "examples", "$comment"}
    return not (set(schema) - annotations)


def schema_depth(schema: Any) -> int | None:
    """Return how deep a JSON value meeting schema can nest ({} and [] count one
    each: {"a": [1]} is 2), or None when it is not bounded ($ref, an open value,
    an object that takes any other property)."""
    if schema is True or not isinstance(schema, dict):
        return None if schema is True or schema is None else 0
    if "$ref" in schema or _is_open(schema):
        return None
    if "const" in schema or "enum" in schema:
        values = schema.get("enum", [schema.get("const")])
        return 1 if any(isinstance(v, (dict, list)) for v in values) else 0
    children: list[Any] = [s for key in _SCHEMA_LISTS for s in schema.get(key) or []]
    children += list((schema.get("properties") or {}).values())
    for key in ("items", "additionalProperties"):
        if key in schema and schema[key] is not False:
            children.append(schema[key])
    if "type" not in schema and not any(key in schema for key in _SCHEMA_LISTS):
        return None                     # any type of value, arrays and objects included
    types = schema.get("type") if isinstance(schema.get("type"), list) else [schema.get("type")]
    if "object" in types and "additionalProperties" not in schema:
        return None
    if "array" in types and "items" not in schema and "prefixItems" not in schema:
        return None
    depths = [schema_depth(child) for child in children]
    if None in depths:
        return None
    nested = max(depths, default=0)
    return nested + 1 if {"object", "array"} & set(types) else nested


def grammar_damage(output: str, schema: dict | None) -> str | None:
    """Tell how a refused constrained answer looks damaged by the grammar, or None:
    U+FFFD characters, text that is not JSON, a key with a "?" the schema does not name
    (gpt-oss under LM Studio, valid unconstrained: LM Studio bug tracker #1555). JSON that
    merely breaks the schema is the model's mistake, for the retry to fix; a server that
    does not enforce the schema (llama.cpp #10732) would gain nothing from its removal."""
    if "\ufffd" in output:
        return "it holds U+FFFD replacement characters"
    try:
        value = parse_json_output(output)
    except (OutputInvalid, RecursionError):     # nested past what json parses: not valid JSON
        return "it is not valid JSON"
    named = set((schema or {}).get("properties") or {})
    keys = value if isinstance(value, dict) else {}
    garbled = [key for key in keys if "?" in key and key not in named]
    return f"it has the garbled key {clip(garbled[0], 40, 'key')!r}" if garbled else None


class DegenerationGuard:
    """Watch an output while it streams; raise OutputDegenerate as soon as it
    degenerates, so its request is cancelled (the caller closes the stream; llama.cpp's
    server, llama-cpp-python's and LM Studio then stop generating: ggml-org/llama.cpp
    tools/server/server.cpp hands the request's is_connection_closed to the completion;
    llama_cpp/server/app.py checks request.is_disconnected() after each chunk; LM Studio
    logs "Client disconnected. Stopping generation...", lmstudio-ai/.github#10).

    Degenerate: past the DEGENERATE_* limits, or JSON nested deeper than max_depth
    (checked_depth; None: not checked). text: what was fed.
    """


    def __init__(self, max_depth: int | None = None):
        self.max_depth = max_depth
        self.pieces: list[str] = []
        self.words: list[str] = []
        self._partial = ""              # a word not yet ended by whitespace
        self._space = ""                # the run of whitespace at the end of the text
        self._depth, self._json, self._in_string, self._escaped = 0, False, False, False

    @property
    def text(self) -> str:
        """The output fed so far."""
        return "".join(self.pieces)

    def feed(self, piece: str) -> None:
        """Take the next piece of streamed text; raise OutputDegenerate when it degenerates."""
        self.pieces.append(piece)
        self._whitespace(piece)
        if self.max_depth is not None:
            for char in piece:
                self._nesting(char)
        self._repeats(piece)

    def _whitespace(self, piece: str) -> None:
        text = self._space + piece          # a run may have begun in an earlier piece
        self._space = ""
        for run in re.finditer(r"\s+", text):
            newlines = run.group().count("\n")
            if newlines > DEGENERATE_NEWLINES:
                raise OutputDegenerate(f"stopped: {newlines} newlines in a row")
            if len(run.group()) > DEGENERATE_WHITESPACE:
                raise OutputDegenerate(
                    f"stopped: {len(run.group())} whitespace characters in a row")
            if run.end() == len(text):
                self._space = run.group()

    def _nesting(self, char: str) -> None:
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
        elif char == '"' and self._json:
            self._in_string = True
        elif char in "{[":
            self._json, self._depth = True, self._depth + 1
            if self._depth > self.max_depth:    # type: ignore[operator]
                raise OutputDegenerate(f"stopped: JSON nested {self._depth} deep, deeper than the "
                                       f"{self.max_depth} its schema allows")
        elif char in "}]" and self._depth:
            self._depth -= 1

    def _repeats(self, piece: str) -> None:
        parts = (self._partial + piece).split()
        ended = piece[-1:].isspace()
        self._partial = "" if ended or not parts else parts.pop()
        for word in parts:
            self.words.append(word)
            self._check_tail()
        del self.words[:-(DEGENERATE_MAX_PERIOD * DEGENERATE_REPEATS + DEGENERATE_REPEAT_WORDS)]

    def _check_tail(self) -> None:
        words = self.words
        for period in range(1, DEGENERATE_MAX_PERIOD + 1):
            times = max(DEGENERATE_REPEATS, -(-DEGENERATE_REPEAT_WORDS // period))
            if len(words) < period * times:
                return
            if words[-1] != words[-1 - period]:
                continue                    # the cheap test first: most words repeat nothing
            unit = words[-period:]
            if all(words[-(n + 1) * period:len(words) - n * period] == unit
                   for n in range(1, times)):
                raise OutputDegenerate(f"stopped: the same {period} word(s) repeated {times} "
                                       f"times in a row ({' '.join(unit)[:80]!r})")


###############################################################################
# 15. Validation types
#
# One class per validation type of bridge-plan-schema.json, filed in VALIDATION_TYPES by
# register_validation (as pycodestyle's register_check): its check, its sentence for the
# prompt, the schema sent, its answer budget, its plan problems, its depth rule; the
# functions after the classes read the registry. A new type is one class here plus its
# name in the schema's enum (a test keeps the two equal).
###############################################################################

VALIDATION_TYPES = {}       # {name: an instance of its ValidationType subclass}


def schema_errors(schema: Any, value: Any = None, *, check_schema: bool = False) -> list:
    """Return the errors (jsonschema's ValidationError) of value under a Draft 2020-12 JSON
    Schema, sorted by their path in value; with check_schema, [the SchemaError] of a schema
    jsonschema refuses, else []. The one site importing jsonschema (--help and --list never
    need it). Raises what applying a schema raises (referencing's Unresolvable, RecursionError).
    """
    from jsonschema import Draft202012Validator, SchemaError

    if check_schema:
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            return [exc]
        return []
    return sorted(Draft202012Validator(schema).iter_errors(value),
                  key=lambda e: list(e.absolute_path))


def register_validation(cls: type) -> type:
    """Class decorator: file an instance of cls in VALIDATION_TYPES under cls.name."""
    VALIDATION_TYPES[cls.name] = cls()
    return cls


class ValidationType:
    """One validation type; a subclass overrides what differs. name: the "type" a plan
    writes. max_tokens: the answer's when the step sets none (answer_tokens caps it).
    runs_command: it runs a program in the project once file_output is written (only in
    trusted projects) instead of checking the answer. grounded: it takes "grounded" (the
    schema's if/then names the same types)."""

    __slots__ = ()
    name = ""
    max_tokens = ANSWER_RESERVE_TOKENS
    runs_command = False
    grounded = False

    def check(self, text: str, validation: dict, source: str) -> str:
        """Return the artifact of an answer; raise OutputInvalid (see check_output)."""
        raise NotImplementedError

    def describe(self, validation: dict) -> str:
        """One sentence telling the model what answer is accepted, or ""."""
        return ""

    def output_schema(self, validation: dict) -> dict | None:
        """The JSON Schema sent for constrained decoding, or None (the answer is not JSON)."""
        return None

    def problems(self, validation: dict, where: str) -> list[str]:
        """The problems a schema cannot state, each "<where>...: why" (validation_problems)."""
        return []

    def depth(self, validation: dict) -> int | None:
        """How deep an answer that passes can nest, or None (not bounded)."""
        return None


@register_validation
class NonEmpty(ValidationType):
    """The default: any answer but an empty one."""

    __slots__ = ()
    name = "non_empty"

    def check(self, text: str, validation: dict, source: str) -> str:
        artifact = extract_code(text)
        if not artifact.strip():
            raise OutputInvalid("output is empty" if not text.strip()
                                else "the fenced block is empty")
        return artifact

    def describe(self, validation: dict) -> str:
        return "Answer with the requested content."


class JsonAnswer(ValidationType):
    """An answer that is JSON, checked by check_value and, when "grounded", against the
    step's input; its artifact is the JSON re-serialised. A six-key extraction is 40-90
    tokens on SmolLM2: 256 stop a runaway within seconds on a small CPU."""

    __slots__ = ()
    max_tokens = 256
    grounded = True

    def check(self, text: str, validation: dict, source: str) -> str:
        value = parse_json_output(text)
        self.check_value(value, validation)
        if validation.get("grounded"):
            check_grounded(value, source)
        return json.dumps(value, ensure_ascii=False, indent=2)

    def check_value(self, value: Any, validation: dict) -> None:
        """Raise OutputInvalid when the parsed answer does not pass."""

    def output_schema(self, validation: dict) -> dict | None:
        return {}


@register_validation
class Json(JsonAnswer):
    """Any JSON value."""

    __slots__ = ()
    name = "json"

    def describe(self, validation: dict) -> str:
        return "Answer with valid JSON only, in a ```json fenced block."


@register_validation
class ContainsKeys(JsonAnswer):
    """A JSON object holding the keys listed."""

    __slots__ = ()
    name = "contains_keys"

    def check_value(self, value: Any, validation: dict) -> None:
        if not isinstance(value, dict):
            raise OutputInvalid(f"output must be a JSON object, got a JSON {type(value).__name__}")
        missing = [key for key in validation["keys"] if key not in value]
        if missing:
            raise OutputInvalid(f"JSON object lacks the keys {missing}")

    def describe(self, validation: dict) -> str:
        keys = ", ".join(map(json.dumps, validation.get("keys", [])))
        return f"Answer with one JSON object that has the keys {keys}, in a ```json fenced block."

    def output_schema(self, validation: dict) -> dict | None:
        """An object of exactly its keys, each a bounded_value, so a small model puts the
        sentence's values in the keys instead of nesting objects (the check takes any)."""
        keys = validation["keys"]
        return {"type": "object", "properties": {key: bounded_value() for key in keys},
                "required": list(keys), "additionalProperties": False}


@register_validation
class JsonSchema(JsonAnswer):
    """JSON valid by the plan's own JSON Schema (Draft 2020-12)."""

    __slots__ = ()
    name = "json_schema"
    max_tokens = 512        # its objects may nest and list more

    def check_value(self, value: Any, validation: dict) -> None:
        try:
            errors = schema_errors(validation["schema"], value)
        except (RecursionError, MemoryError):
            raise
        except Exception as exc:    # noqa: BLE001 - a plan's schema (check_schema passed) may still
            # fail to apply: a $ref that resolves nowhere raises referencing's Unresolvable
            raise OutputInvalid(f"the step's json_schema cannot be applied ({type(exc).__name__}: "
                                f"{clip(str(exc), 200, 'message')})") from None
        if errors:
            raise OutputInvalid("JSON does not match the schema: " + "; ".join(
                f"{e.json_path}: {schema_message(e)}" for e in errors[:5]))

    def describe(self, validation: dict) -> str:
        return ("Answer with JSON matching this JSON Schema, in a ```json fenced block: "
                + json.dumps(validation.get("schema")))

    def output_schema(self, validation: dict) -> dict | None:
        """The plan's schema with bounds added where it sets none (bounded_schema)."""
        schema = validation["schema"]
        return bounded_schema(schema) if isinstance(schema, dict) else {}

    def problems(self, validation: dict, where: str) -> list[str]:
        """A schema jsonschema refuses, or one that fails on a few plain values (a $ref
        resolving nowhere, or to itself without end), before anything is sent."""
        where = f"{where}.schema"
        if refusal := schema_errors(validation["schema"], check_schema=True):
            return [f"{where}: not a valid JSON Schema ({schema_message(refusal[0])})"]
        for probe in (None, {}, [], "", 0):
            try:
                schema_errors(validation["schema"], probe)
            except RecursionError:
                return [f"{where}: refers to itself without end"]
            except Exception as exc:    # noqa: BLE001 - referencing's Unresolvable and its kin
                return [f"{where}: cannot be applied "
                        f"({type(exc).__name__}: {clip(str(exc), 200, 'message')})"]
        return []

    def depth(self, validation: dict) -> int | None:
        return schema_depth(validation["schema"])


@register_validation
class SyntaxCheck(ValidationType):
    """Code that parses in its language (python, json, toml)."""

    __slots__ = ()
    name = "syntax_check"

    def check(self, text: str, validation: dict, source: str) -> str:
        language = validation.get("language", "python")
        code = extract_code(text, language)
        if not code.strip():
            raise OutputInvalid(f"no {language} code in the output")
        try:
            if language == "python":
                compile(code, "<output>", "exec", dont_inherit=True)
            elif language == "json":
                json.loads(code)
            elif language == "toml":
                import tomllib
                tomllib.loads(code)
        except SyntaxError as exc:
            raise OutputInvalid(f"python syntax error at line {exc.lineno}: {exc.msg}") from exc
        except ValueError as exc:   # json.JSONDecodeError and tomllib.TOMLDecodeError
            raise OutputInvalid(f"{language} does not parse: {exc}") from exc
        return code if code.endswith("\n") else code + "\n"

    def describe(self, validation: dict) -> str:
        language = validation.get("language", "python")
        return f"Answer with complete {language} code in one ```{language} fenced block."


@register_validation
class Regex(ValidationType):
    """An answer re.search finds the pattern in."""

    __slots__ = ()
    name = "regex"

    def check(self, text: str, validation: dict, source: str) -> str:
        if not re.search(validation["pattern"], text):
            raise OutputInvalid(f"output does not match the pattern {validation['pattern']!r}")
        return extract_code(text)

    def describe(self, validation: dict) -> str:
        return f"Your answer must match the regular expression {validation.get('pattern')!r}."

    def problems(self, validation: dict, where: str) -> list[str]:
        try:
            re.compile(validation["pattern"])
        except re.error as exc:
            return [f"{where}.pattern: not a valid regular expression ({exc})"]
        return []


def shell_words(argv: list[str]) -> str:
    """An argv as typed in a POSIX shell (for messages: commands never go through one)."""
    import shlex

    return shlex.join(argv)


@register_validation
class Command(ValidationType):
    """The project's own check (a test, a linter: "run", "timeout_s"), run once
    file_output is written; it passes on exit 0 (answer_checks leaves it out)."""

    __slots__ = ()
    name = "command"
    runs_command = True

    def describe(self, validation: dict) -> str:
        argv = shell_words(validation["run"])
        return f"It will then be checked by running `{argv}` in the project."


class UnknownType(ValidationType):
    """A type no class is registered for (the plan schema refuses it before a run)."""

    __slots__ = ()

    def check(self, text: str, validation: dict, source: str) -> str:
        raise OutputInvalid(f"unknown validation type {validation.get('type', 'non_empty')!r}")


_UNKNOWN_TYPE = UnknownType()


def validation_type(validation: dict) -> ValidationType:
    """The registered class of a validation object (non_empty when it names no type;
    else an UnknownType)."""
    kind = validation.get("type", "non_empty")
    return VALIDATION_TYPES.get(kind, _UNKNOWN_TYPE) if isinstance(kind, str) else _UNKNOWN_TYPE


def validations_of(validation: dict | list) -> list[dict]:
    """Return a step's validation as a list: a list as given, an object as [object]."""
    return list(validation) if isinstance(validation, list) else [validation]


def is_command(validation: Any) -> bool:
    """Tell whether a validation (untrusted: any JSON value) runs a program in the project."""
    return isinstance(validation, dict) and validation_type(validation).runs_command


def _commands_of(step: "Step") -> list[dict]:
    """The command validations of a step, in order."""
    return [v for v in validations_of(step.validation) if is_command(v)]


def answer_checks(validation: dict | list) -> list[dict]:
    """A step's validations but its commands, in order, or [DEFAULT_VALIDATION]."""
    return [v for v in validations_of(validation) if not is_command(v)] or [DEFAULT_VALIDATION]


def check_output(text: str, validation: dict | list, source: str = "") -> str:
    """Check a model output (reasoning taken out) against each of a step's answer_checks
    in order; return the first's artifact. source: the step's input, which a "grounded"
    answer's values must come from. Raises OutputInvalid with a message the model can use."""
    try:
        artifacts = [validation_type(v).check(text, v, source) for v in answer_checks(validation)]
    except (RecursionError, MemoryError) as exc:
        # json, tomllib, compile() and jsonschema recurse per nesting level
        raise OutputInvalid(f"output nests too deeply to check ({type(exc).__name__})") from None
    return artifacts[0]


def output_schema(validation: dict | list, source: str | None = None) -> dict | None:
    """Return the JSON Schema sent for constrained decoding: the first validation's that
    sends one, else None. source: the step's input; a "grounded" step whose input has few
    enough spans (grounded_spans) gets span_schema."""
    if isinstance(validation, list):
        return next((schema for item in validation
                     if (schema := output_schema(item, source)) is not None), None)
    kind = validation_type(validation)
    usual = kind.output_schema(validation)
    if source is not None and usual and kind.grounded and \
            (spans := grounded_spans(validation, source)) is not None:
        return span_schema(usual, *spans)
    return usual


def checked_depth(validation: dict | list) -> int | None:
    """Return how deep a step's output can nest and pass: the depth rule of its first
    validation that sends a schema, else None (a contains_keys value may be anything)."""
    first = next((v for v in validations_of(validation)
                  if validation_type(v).output_schema(v) is not None), None)
    return validation_type(first).depth(first) if first else None


def describe_validation(validation: dict | list) -> str:
    """Return the sentences telling the model what answer is accepted, one per check."""
    if isinstance(validation, list):
        return " ".join(filter(None, (describe_validation(item) for item in validation)))
    return validation_type(validation).describe(validation)


def validation_problems(validation: Any, where: str) -> list[str]:
    """The problems of a step's validation (untrusted: any JSON value) the schema cannot
    state: of one object, or of each object of a list; where: its JSON path."""
    items = validation if isinstance(validation, list) else [validation]
    return [problem for k, item in enumerate(items) if isinstance(item, dict)
            for problem in validation_type(item).problems(
                item, f"{where}[{k}]" if isinstance(validation, list) else where)]


def default_max_tokens(validation: dict | list) -> int:
    """The max_tokens of an answer whose step sets none: the largest of its answer
    checks' types (ValidationType.max_tokens), before the context caps it."""
    return max(validation_type(v).max_tokens for v in answer_checks(validation))


###############################################################################
# 16. Plans
###############################################################################


@functools.cache
def load_schema() -> dict:
    """Return the plan schema beside this module; BridgeError when missing (broken install)."""
    path = Path(__file__).with_name(SCHEMA_FILENAME)
    try:
        return read_json_file(path, follow_symlinks=True)     # an install may link it
    except (OSError, ValueError) as exc:
        raise BridgeError(f"cannot read the plan schema {path}: {exc}",
                          "reinstall bridge: the schema file ships beside bridge.py") from exc


_STEP_OVERRIDES = ("system", "temperature", "max_tokens", "model", "timeout_s", "thinking")
_STEP_DEFAULTS = {                      # every field of Step after id (int) and prompt (str)
    "title": "",
    "depends_on": (),                   # tuple[int, ...]
    "validation": DEFAULT_VALIDATION,   # shared, never changed
    "max_retries": DEFAULT_MAX_RETRIES,
    "on_failure": DEFAULT_ON_FAILURE,
    "file_output": None,                # str | None
    **dict.fromkeys(_STEP_OVERRIDES),   # plan defaults a step may override; None: not set
}


class Step(namedtuple("Step", ["id", "prompt", *_STEP_DEFAULTS], defaults=_STEP_DEFAULTS.values())):
    """One step of a plan, with plan defaults and the schema's defaults applied.

    Fields as in bridge-plan-schema.json; timeout_s is in seconds, max_tokens in tokens;
    validation is one validation object or a list of them (validations_of).
    """

    __slots__ = ()

    @property
    def label(self) -> str:
        """"step N (title)" or "step N"."""
        return f"step {self.id} ({self.title})" if self.title else f"step {self.id}"


class Plan(namedtuple("Plan", "id steps objective project files_context rollback_strategy "
                              "escalate_to verify", defaults=("", None, {}, "none", None, None))):
    """A validated plan: id (str), steps ({id: Step}), objective (str), project (a Path,
    or None), files_context ({relative path: "LOAD" | "REFERENCE"}; the default {} is
    shared, never changed), rollback_strategy, escalate_to (a model reference, or None),
    verify ({"run": argv, "timeout_s": seconds}, or None)."""

    __slots__ = ()


def _schema_problems(plan: Any) -> list[str]:
    return [problem for error in schema_errors(load_schema(), plan)
            for problem in _unknown_key_problems(error)
            or [f"{error.json_path}: {schema_message(error)}{_close_value_hint(error)}"]]


def _did_you_mean(word: str, known: list[str]) -> str:
    """"did you mean 'skip'?" for the closest of known (difflib.get_close_matches), or ""."""
    import difflib

    close = difflib.get_close_matches(word, known, n=1)
    return f"did you mean {close[0]!r}?" if close else ""


def _close_value_hint(error: Any) -> str:
    """"; did you mean 'skip'?" for a misspelt string among an enum's values (an
    "enum" error), else ""."""
    if error.validator != "enum" or not isinstance(error.instance, str):
        return ""
    values = [v for v in error.validator_value if isinstance(v, str)]
    hint = _did_you_mean(error.instance, values)
    return f"; {hint}" if hint else ""


PLANNER_KEY_PREFIX = "x-"       # the schema's patternProperties: keys a planner adds on purpose


def _unknown_key_problems(error: Any) -> list[str]:
    """One problem per key the schema does not know (additionalProperties or
    unevaluatedProperties false), with the closest of the schema's own keys: "$.steps[0].
    file_ouput: unknown key; did you mean 'file_output'?"; [] for any other error."""
    if error.validator not in ("additionalProperties", "unevaluatedProperties") \
            or not isinstance(error.instance, dict) or error.validator_value is not False:
        return []
    known = sorted(error.schema.get("properties", {}))
    patterns = list(error.schema.get("patternProperties", {}))
    problems = []
    for key in error.instance:
        if key in known or any(re.search(pattern, key) for pattern in patterns):
            continue
        where = f".{key}" if re.fullmatch(r"[A-Za-z_$][\w$-]*", key) else f"[{key!r}]"
        fix = (_did_you_mean(key, known) or
               f"known here: {', '.join(known)} "
               f"(a key of your own starts with {PLANNER_KEY_PREFIX})")
        problems.append(f"{error.json_path}{where}: unknown key; {fix}")
    return problems or [f"{error.json_path}: {schema_message(error)}"]


def _semantic_problems(plan: dict, guard: Guard | None = None) -> list[str]:
    """The rules a schema cannot state (unique step ids, known depends_on, no cycle,
    validation_problems, prompt size, _path_problems), on a plan it found fault with too
    (skipping the malformed parts: the schema said so)."""

    problems: list[str] = []
    steps = [s for s in plan.get("steps") or []
             if isinstance(s, dict) and isinstance(s.get("id"), int)]
    ids = [s["id"] for s in steps]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"$.steps: step id {dup} is used more than once")
    known = set(ids)
    graph = {}
    for n, step in enumerate(steps):
        deps = [d for d in step.get("depends_on") or [] if isinstance(d, int)] \
            if isinstance(step.get("depends_on"), list) else []
        graph[step["id"]] = [d for d in deps if d in known and d != step["id"]]   # each said below
        for dep in deps:
            if dep == step["id"]:
                problems.append(f"$.steps[{n}].depends_on: step {dep} depends on itself")
            elif dep not in known:
                problems.append(f"$.steps[{n}].depends_on: unknown step {dep}")
        problems += validation_problems(step.get("validation"), f"$.steps[{n}].validation")
        if isinstance(step.get("prompt"), str) and len(step["prompt"]) > MAX_PROMPT_CHARS:
            problems.append(f"$.steps[{n}].prompt: {len(step['prompt']):,} characters; bridge "
                            f"takes at most {MAX_PROMPT_CHARS:,} (put large text in a LOAD file)")
    try:            # every problem at once: a cycle among the known steps as well
        TopologicalSorter(graph).prepare()
    except CycleError as exc:
        cycle = " -> ".join(str(i) for i in exc.args[1])
        problems.append(f"$.steps: dependency cycle {cycle}")
    return problems + _path_problems(plan, guard)


def _path_problems(plan: dict, guard: Guard | None = None) -> list[str]:
    """The problems of a plan's paths (the room 'Path rules'): its project, every
    files_context path (a LOAD's load_refusal, and that it reads as text or a step writes
    it), every file_output."""
    context = plan.get("context") if isinstance(plan.get("context"), dict) else {}
    files = context.get("files_context") if isinstance(context.get("files_context"), dict) else {}
    steps = plan.get("steps") if isinstance(plan.get("steps"), list) else []
    outputs = {s["file_output"]: n for n, s in enumerate(steps)
               if isinstance(s, dict) and isinstance(s.get("file_output"), str)}
    written = {same_file_path(rel) for rel in outputs}
    if "project" in context and not isinstance(context["project"], str):
        return []                   # the schema has said what is wrong with it
    if "project" not in context:
        if files or outputs:
            return ["$.context.project: required when the plan names files "
                    "(files_context or file_output)"]
        return [f"{where}: a command runs in the project; set context.project to the folder "
                "it checks" for where in _command_paths(plan)]
    project = Path(context["project"])
    if not os.path.isdir(project):      # False, not OSError, for a name too long to look up
        return [f"$.context.project: folder {project} does not exist"]
    problems = []
    for rel, mode in files.items():
        path, refused = load_refusal(project, rel)
        if path is None or (mode == "LOAD" and refused):
            problems.append(f"$.context.files_context[{rel!r}]: {refused}")
            continue
        if mode != "LOAD":
            continue
        try:
            read_load_file(path, rel, project)
        except FileNotFoundError:
            if same_file_path(rel) not in written:
                problems.append(f"$.context.files_context[{rel!r}]: LOAD file does not exist "
                                "and no step writes it")
        except (PathError, IsADirectoryError) as exc:
            problems.append(f"$.context.files_context[{rel!r}]: {exc}")
    for rel, n in outputs.items():
        if reason := output_path_problem(project, rel, guard):
            problems.append(f"$.steps[{n}].file_output: {reason}")
    return problems


def load_refusal(project: Path, rel: str) -> tuple[Path | None, str | None]:
    """Return (where rel resolves inside project, or None, and why a LOAD of it may not go to
    a model, or None): outside the project (resolve_inside's PathError), else a secret
    (load_secret_reason). The one order for check_plan and for what approval shows."""
    try:
        path = resolve_inside(project, rel)
    except PathError as exc:
        return None, str(exc)
    return path, load_secret_reason(project, rel, path)


def _command_paths(plan: dict) -> list[str]:
    """The JSON paths of a plan's commands: command validations, and verify."""
    paths = ["$.verify"] if isinstance(plan.get("verify"), dict) else []
    steps = plan.get("steps") if isinstance(plan.get("steps"), list) else []
    for n, step in enumerate(steps):
        validation = step.get("validation") if isinstance(step, dict) else None
        items = validation if isinstance(validation, list) else [validation]
        paths += [f"$.steps[{n}].validation" + (f"[{k}]" if isinstance(validation, list) else "")
                  for k, item in enumerate(items) if is_command(item)]
    return paths


def check_plan(plan: Any, guard: Guard | None = None) -> Plan:
    """Validate a parsed plan with the schema (strict: _unknown_key_problems; x- keys
    are the planner's own), then by the rules it cannot state (_semantic_problems,
    _path_problems; guard: forbidden_target_reason's); return a Plan. Raises PlanInvalid
    listing every problem found, each prefixed with its JSON path."""

    plan_id = plan.get("id") if isinstance(plan, dict) and isinstance(plan.get("id"), str) else "?"
    if isinstance(plan, UnreadablePlan):
        raise PlanInvalid(plan_id, [f"$: {plan.reason}"])
    if not isinstance(plan, dict):
        raise PlanInvalid(plan_id, ["$: a plan is a JSON object, not a JSON "
                                    f"{type(plan).__name__}"])
    if (depth := json_depth(plan)) > MAX_JSON_DEPTH:
        raise PlanInvalid(plan_id, [f"$: the plan nests {depth} levels deep; bridge reads at "
                                    f"most {MAX_JSON_DEPTH}"])
    try:
        json.dumps(plan, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError as exc:   # "\ud800": no request body or file name can carry it
        raise PlanInvalid(plan_id, ["$: the plan holds a lone surrogate "
                                    f"({exc.object[exc.start]!r}), which is not text; write the "
                                    "character whole"]) from None
    except ValueError as exc:           # NaN or Infinity in a plan given as a dict
        raise PlanInvalid(plan_id, [f"$: the plan cannot be written as JSON ({exc})"]) from None
    try:
        problems = _schema_problems(plan)
    except RecursionError:      # MAX_JSON_DEPTH leaves room; this is the last guard
        raise PlanInvalid(plan_id, ["$: the plan nests too deeply to check"]) from None
    try:
        problems += _semantic_problems(plan, guard)
    except RecursionError:
        problems.append("$: the plan nests too deeply to check")
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        if not problems:    # schema-valid, yet a rule could not check it: never run it unchecked
            problems.append(f"$: the plan could not be checked ({type(exc).__name__}: {exc}); "
                            "it is refused rather than run unchecked")
        # else too malformed for the semantic rules; the schema problems say why
    if problems:
        raise PlanInvalid(plan_id, problems)
    return _build_plan(plan)


def _build_plan(plan: dict) -> Plan:

    defaults = plan.get("defaults", {})
    steps = {}
    for raw in plan["steps"]:
        overrides = {k: raw.get(k, defaults.get(k)) for k in _STEP_OVERRIDES}
        steps[int(raw["id"])] = Step(
            id=int(raw["id"]), prompt=raw["prompt"], title=raw.get("title", ""),
            depends_on=tuple(int(dep) for dep in raw.get("depends_on", ())),
            validation=raw.get("validation", dict(DEFAULT_VALIDATION)),
            max_retries=raw.get("max_retries", DEFAULT_MAX_RETRIES),
            on_failure=raw.get("on_failure", DEFAULT_ON_FAILURE),
            file_output=same_file_path(raw["file_output"]) if "file_output" in raw else None,
            **overrides)
    context = plan.get("context", {})
    project = Path(context["project"]) if "project" in context else None
    files_context: dict[str, str] = {}
    for rel, mode in context.get("files_context", {}).items():      # LOAD wins over REFERENCE
        key = same_file_path(rel)
        files_context[key] = "LOAD" if "LOAD" in (mode, files_context.get(key)) else mode
    return Plan(id=plan["id"], steps=steps, objective=context.get("objective", ""),
                project=project, files_context=files_context,
                rollback_strategy=plan.get("rollback_strategy", "none"),
                escalate_to=defaults.get("escalate_to"), verify=plan.get("verify"))


###############################################################################
# 17. Executors: the registry, the chat contract, model references
#
# An executor is one class (its facts: Executor) and its registry line
# (@register_executor); every executor answers one call, chat(messages, ChatRequest)
# -> Completion, dropping what it cannot send. The trust gate, the approval facts,
# --allow-executor, the spend cap and the runner read EXECUTORS, never a class name
# (bottle's server_names and ServerAdapter are the model). The classes are in the
# rooms below it, from 'Model server replies' to 'Other executors'.
###############################################################################


class Completion(namedtuple("Completion", "text usage model finish_reason duration_s cost_usd "
                            "reasoning reasoning_pieces response_format",
                            defaults=(0.0, "", 0, None))):
    """One model reply: text (reasoning excluded), usage ({"prompt_tokens",
    "completion_tokens"}, or None when the server sent none), model (that answered, or
    None), finish_reason (or None), duration_s (seconds), cost_usd (US dollars; 0 on a
    local server; None when the counts could not be believed: priced_reply estimates it),
    reasoning (reasoning_delta's text, or ""), reasoning_pieces (streamed pieces, about a
    token each), response_format (the constraint's type sent, e.g. "json_schema", or None)."""

    __slots__ = ()


class ChatRequest(namedtuple("ChatRequest", "model sampling max_tokens timeout_s json_schema "
                             "thinking on_delta on_reasoning",
                             defaults=(None, None, None, None, None, None, None))):
    """What one chat asks of an executor (the one contract: executor.chat(messages,
    request) -> Completion). model: the id, without its executor prefix; sampling:
    {"temperature", "seed", "repeat_penalty", "dry_multiplier", ...} or None; max_tokens
    (None: the executor's default); timeout_s (seconds, the step's: narrows --timeout per
    read and the request's deadline); json_schema (constrain the answer to it, or None);
    thinking ("off" asks the server not to think); on_delta(str) for each streamed piece
    of answer, on_reasoning(str) for each of thinking. Each executor drops what it cannot
    send."""

    __slots__ = ()


class Executor:
    """One kind of executor, registered in EXECUTORS by its NAME (register_executor); an
    instance answers chat(messages, ChatRequest) -> Completion, raising LLMError. Facts:
    NAME (--allow-executor's word); PREFIX (of "PREFIX:model" references; "": claims()
    decides); PAID (counted against --max-cost-usd); AGENTIC (it acts: in the plan's
    project when trusted, else a scratch folder); CLOUD (the prompt and files leave this
    machine); PROBED (the run's model server, Runner.client: probed, sent sampling,
    thinking and constrained JSON); WATCHED (DegenerationGuard watches its stream);
    DEFAULT_MAX_TOKENS (None: the server's). A PAID, AGENTIC or CLOUD one runs only when
    the user allowed it (needs_allowing)."""

    NAME = PREFIX = ""
    PAID = AGENTIC = CLOUD = PROBED = WATCHED = False
    DEFAULT_MAX_TOKENS: "int | None" = None

    @classmethod
    def needs_allowing(cls) -> bool:
        """Whether steps run on it only with --allow-executor NAME."""
        return cls.PAID or cls.AGENTIC or cls.CLOUD

    @classmethod
    def claims(cls, prefix: str, name: str) -> bool:
        """Whether a model reference split into (prefix, name) (parse_model_ref) is
        this executor's."""
        return prefix == cls.PREFIX

    @classmethod
    def refusal(cls, ref: str, name: str) -> tuple[str, str]:
        """(message, hint) of an LLMError for a step on it the user has not allowed."""
        return (f"the {cls.NAME} executor is not allowed (model {ref})",
                f"let it run with --allow-executor {cls.NAME}")

    @classmethod
    def for_run(cls, config: Config, cwd: "Path | None",
                on_retry: "Callable[[str], None]") -> "Executor":
        """Open one for a run: cwd is the plan's project when trusted, else None (an
        AGENTIC executor's scratch folder); on_retry(message) is told of each retry.
        Raises LLMError when it cannot be used (no key, no binary)."""
        return cls(config, on_retry=on_retry)

    def chat(self, messages: list[dict], request: "ChatRequest") -> "Completion":
        """Send one chat: messages [{"role", "content"}]; see ChatRequest, Completion."""
        raise NotImplementedError

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release what it holds (connections); nothing by default."""


def register_executor(cls: "type[Executor]") -> "type[Executor]":
    """Put an Executor class in EXECUTORS under its NAME (a class decorator: adding an
    executor is its class and this line). Raises ValueError for a NAME or PREFIX taken."""
    taken = {c.PREFIX for c in EXECUTORS.values() if c.PREFIX}
    if not cls.NAME or cls.NAME in EXECUTORS or (cls.PREFIX and cls.PREFIX in taken):
        raise ValueError(f"executor {cls.NAME!r} (prefix {cls.PREFIX!r}) is already registered")
    EXECUTORS[cls.NAME] = cls
    return cls


def parse_model_ref(ref: str) -> tuple[str, str]:
    """Split a model reference into (prefix, model): "anthropic:claude-haiku-4-5" →
    ("anthropic", "claude-haiku-4-5"); a bare name, or one whose prefix is no executor's,
    is an openai: one (LM Studio keys hold colons)."""

    kind, sep, name = ref.partition(":")
    if sep and name and any(kind == cls.PREFIX for cls in EXECUTORS.values() if cls.PREFIX):
        return kind, name
    return DEFAULT_EXECUTOR, ref


def is_cloud_model(name: str) -> bool:
    """Whether an Ollama model name is one of its cloud models, run on ollama.com
    (gpt-oss:120b-cloud, NAME:cloud; Ollama docs/cloud.mdx)."""
    return name.endswith("-cloud") or name.endswith(":cloud") or ":cloud-" in name


def _executor_of(ref: str) -> str:
    """The NAME of the executor a model reference runs on: the first in EXECUTORS that
    claims it (an Ollama cloud model's is "ollama-cloud"), else its prefix's."""
    prefix, name = parse_model_ref(ref)
    return next((n for n, cls in EXECUTORS.items() if cls.claims(prefix, name)), prefix)


def executor_class(ref: str) -> "type[Executor]":
    """The Executor class a model reference runs on (_executor_of)."""
    return EXECUTORS[_executor_of(ref)]


###############################################################################
# 18. Trust: projects, approvals, executors
#
# Trust: which plans may run. Only the user's own files and flags decide (trusted
# projects, approvals pinned to a plan's content hash, allowed executors); nothing a
# plan or the store says can widen it.
###############################################################################


PROJECT_NAME_MAX_CHARS = 100         # a longer detected name is cut (it becomes a tag)
PROJECT_FILE_MAX_BYTES = 1_000_000   # of a package.json or pyproject.toml, only this is read


def project_name(folder: Path) -> str:
    """Return the project's name as the memory server's Claude Code hooks detect it (so
    they inject a result tagged with it when a session starts there): package.json's
    "name" (else "node-project"), else pyproject.toml's first `name = "…"` line (else
    "python-project"), else the repository's name from remote.origin.url (when .git
    exists), else the folder's name. Source: mcp-memory-service claude-hooks/utilities/
    project-detector.js (detectFramework, getGitInfo, detectProjectContext). The files are
    untrusted: regular files only, not through a symlink (no FIFO to hang on, no file
    elsewhere to quote in a tag), within PROJECT_FILE_MAX_BYTES; the name is one printable
    line of at most PROJECT_NAME_MAX_CHARS. Never raises."""
    import subprocess

    def read(name: str) -> str | None:
        try:
            with open_regular(folder / name) as handle:
                return handle.read(PROJECT_FILE_MAX_BYTES).decode("utf-8", "replace")
        except OSError:
            return None

    name = None
    if (text := read("package.json")) is not None:
        try:
            package = load_json(text)
        except ValueError:
            package = None
        given = package.get("name") if isinstance(package, dict) else None
        name = given if isinstance(given, str) and given else "node-project"
    elif (text := read("pyproject.toml")) is not None:
        match = re.search(r"""^name\s*=\s*["']([^"']+)["']""", text, re.MULTILINE)
        name = match.group(1) if match else "python-project"
    elif os.path.lexists(folder / ".git"):
        try:
            url = subprocess.run(
                ["git", "-C", str(folder), "config", "--get", "remote.origin.url"],
                capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
            remote = url.stdout.strip() if url.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError):
            remote = ""
        if remote:     # the hooks: the last path part, its first ".git" removed
            name = remote.rsplit("/", 1)[-1].replace(".git", "", 1) or "unknown-repo"
    if not name:
        name = folder.name
    name = " ".join(re.sub(r"[\x00-\x1f\x7f-\x9f]", " ", name).split())
    return name[:PROJECT_NAME_MAX_CHARS] or folder.name


def untrustable_reason(config: Config, folder: Path) -> str | None:
    """Return why a folder (a real path) can never be a trusted project nor a plan's, or
    None: the filesystem root, a VCS folder, the home folder or one holding it, one
    holding or inside the store, the state dir or the config dir (a plan there could
    replace the store, its own journals or the trust file)."""

    if folder == folder.parent:
        return "it is the filesystem root"
    if vcs := next((part for part in folder.parts if vcs_folder_of(part)), None):
        return f"it is, or lies inside, the version-control folder {vcs} (its hooks run commands)"
    if config.home is not None and folder == real_path(config.home):
        return "it is your home folder itself (trust a project folder inside it)"
    if config.home is not None and real_path(config.home).is_relative_to(folder):
        return f"it holds your home folder {real_path(config.home)}"
    held = [("the memory store", p) for p in config.db_paths] + [
        ("bridge's state folder", config.state_dir),
        ("bridge's trust and approvals folder", config.config_dir)]
    for what, path in held:
        real = real_path(path)
        if real == folder or real.is_relative_to(folder):
            return f"it holds {what} {real}"
        if folder.is_relative_to(real):
            return f"it is inside {what} {real}"
    return None


def trusted_root(config: Config, project: Path) -> Path | None:
    """Return the trusted folder a project lies in (real paths compared), or None; a
    folder untrustable_reason refuses trusts nothing and is never trusted."""
    real = real_path(project)
    if untrustable_reason(config, real):
        return None
    for root in config.trusted_projects:
        if (real == root or real.is_relative_to(root)) and not untrustable_reason(config, root):
            return root
    return None


def config_file_problem(path: Path) -> tuple[str, str] | None:
    """Return (what is wrong, how to fix it) when a trust or approvals file, or its
    folder, could have been written by someone else, as ssh's StrictModes checks: owned
    by another user (root may own it), or writable by group or others. None when both are
    safe, the file does not exist, or the system has no user ids (Windows)."""
    if not hasattr(os, "geteuid"):
        return None
    for where in (path, path.parent):
        try:
            info = os.stat(where)
        except FileNotFoundError:
            continue
        except OSError as exc:
            return f"cannot check {where}: {exc.strerror or exc}", "check that folder's permissions"
        kind = "folder" if stat.S_ISDIR(info.st_mode) else "file"
        if info.st_uid not in (os.geteuid(), 0):
            return (f"{kind} {where} is owned by another user (uid {info.st_uid})",
                    f"if its content is yours: chown {os.geteuid()} {where}; else delete it")
        if info.st_mode & 0o022:
            bits = 0o700 if kind == "folder" else 0o600
            mode = stat.S_IMODE(info.st_mode)
            return (f"{kind} {where} is writable by other users (mode {mode:04o})",
                    f"check its content, then: chmod {bits:o} {where}")
    return None


def read_config_file(path: Path, key: str, kind: type) -> Any:
    """Return document[key] of one of bridge's JSON config files (kind() when there is
    none). Raises ConfigError when it cannot be read, has another shape, or someone else
    could have written it (config_file_problem)."""
    if problem := config_file_problem(path):
        raise ConfigError(f"refusing {path.name}: {problem[0]}, so its trust is not yours",
                          problem[1])
    try:
        document = read_json_file(path, follow_symlinks=True)
    except FileNotFoundError:
        return kind()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", "fix the file or delete it") from exc
    value = document.get(key) if isinstance(document, dict) else None
    if not isinstance(value, kind):
        raise ConfigError(f"{path} has no {key!r} {kind.__name__}", "fix the file or delete it")
    return value


def write_config_file(path: Path, document: dict) -> None:
    """Write one of bridge's config files (write_json_file: atomic, 0600, fsynced) in a
    folder made private (0700). Raises ConfigError on OSError."""
    try:
        private_dir(path.parent, tighten=True)
        write_json_file(path, document, indent=2)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}",
                          "check that folder's permissions") from exc


def load_approvals(config: Config) -> dict:
    """Return {plan id: {"content_hash", "approved_at"}} from config_dir/approvals.json."""
    return read_config_file(Path(config.config_dir, APPROVALS_FILENAME), "approvals", dict)


def plan_trusted(config: Config, plan: Plan, plan_hash: str) -> bool:
    """True when plan.project lies in a trusted project, or the user approved this plan
    (bridge --approve) for exactly this content hash (of the plan memory's content);
    never for a project untrustable_reason refuses. Raises ConfigError when
    approvals.json is unreadable."""
    if plan.project is not None:
        if untrustable_reason(config, real_path(plan.project)):
            return False
        if trusted_root(config, plan.project) is not None:
            return True
    entry = load_approvals(config).get(plan.id)
    if not isinstance(entry, dict) or entry.get("content_hash") != plan_hash:
        return False
    # pinned to the folder approved (real path): a project given as a symlink re-pointed since
    # is another folder, and needs approval again
    pinned = str(real_path(plan.project)) if plan.project is not None else None
    return entry.get("project") == pinned


def approval_facts(config: Config, plan: Plan, plan_hash: str) -> dict:
    """Return what the user needs to decide on a valid plan, and whether it may run:
    {"plan_id", "content_hash", "project" (str or None), "files" (file_output paths),
    "reads" (_load_facts), "runs" (_run_facts), "models" (every model it names),
    "executors" (those its steps and escalation use), "limits" (_limit_facts), "trusted"
    (plan_trusted), "reasons" (why it may not run; []: it may), "commands" (what would let
    it run), "escalation_unused" (why its escalation will be skipped, or None), "may_run"}.
    A plan needs approval unless its project is trusted, or it has no project and runs
    only on the local server; paid and agentic executors need --allow-executor besides,
    which no approval replaces."""

    step_models = {s.model for s in plan.steps.values() if s.model}
    named = sorted(step_models | ({plan.escalate_to} if plan.escalate_to else set()))
    allowed = set(config.allowed_executors)
    step_kinds = sorted(k for k in {_executor_of(m) for m in step_models}
                        if EXECUTORS[k].needs_allowing())
    escalation = _executor_of(plan.escalate_to) if plan.escalate_to else None
    escalation_used = (escalation is not None and escalation in allowed
                       and config.escalate_to is None)
    trusted = plan_trusted(config, plan, plan_hash)
    reasons, commands = [], []
    refused = (untrustable_reason(config, real_path(plan.project))
               if plan.project is not None else None)
    if refused:
        reasons.append(f"project {plan.project} can never be a target: {refused}")
        commands.append(f"bridge --cancel {plan.id}")
    elif not trusted and (plan.project is not None or step_kinds or (
            escalation_used and EXECUTORS[escalation].needs_allowing())):
        reasons.append(f"project {plan.project} is not a trusted project"
                       if plan.project is not None
                       else "it names models beyond the local server and has no project")
        commands.append(f"bridge --approve {plan.id}")
        if plan.project is not None:
            commands.append(f"bridge --trust {plan.project}")
    for kind in step_kinds:
        if kind not in allowed:
            reasons.append(f"its steps run on {kind}: models, which you have not allowed")
            commands.append(f"bridge --allow-executor {kind}")
    unused = None
    if escalation is not None and escalation not in allowed and config.escalate_to is None:
        unused = (f"escalation to {plan.escalate_to} not used: the {escalation} executor is "
                  f"not allowed (pass --allow-executor {escalation})")
    executors = sorted({_executor_of(m) for m in named}
                       | ({DEFAULT_EXECUTOR} if any(not s.model for s in plan.steps.values())
                          else set()))
    return {"plan_id": plan.id, "content_hash": plan_hash,
            "project": str(plan.project) if plan.project is not None else None,
            "files": sorted({s.file_output for s in plan.steps.values() if s.file_output}),
            "reads": _load_facts(plan), "runs": _run_facts(plan), "models": named,
            "executors": executors, "limits": _limit_facts(config, plan), "trusted": trusted,
            "reasons": reasons, "commands": commands, "escalation_unused": unused,
            "may_run": not reasons}


def _load_facts(plan: Plan) -> list[dict]:
    """[{"path", "refused" (why bridge will not send it, as check_plan says: load_refusal;
    else None)}] of the files a plan LOADs into its prompts, sorted by path."""
    return [{"path": rel, "refused": secret_file_reason(rel) if plan.project is None
             else load_refusal(plan.project, rel)[1]}      # --list reads plans unchecked
            for rel, mode in sorted(plan.files_context.items()) if mode == "LOAD"]


def _run_facts(plan: Plan) -> list[dict]:
    """[{"what": "step N check" | "verify", "run" (argv), "cwd", "timeout_s"}]: every
    command a plan runs (its command validations, then its verify), where, how long."""
    cwd = str(plan.project) if plan.project is not None else None

    def fact(what: str, check: dict) -> dict:
        return {"what": what, "run": [str(a) for a in check["run"]], "cwd": cwd,
                "timeout_s": check.get("timeout_s", COMMAND_DEFAULT_TIMEOUT_S)}
    facts = [fact(f"step {sid} check", v)
             for sid, step in sorted(plan.steps.items()) for v in _commands_of(step)]
    return facts + ([fact("verify", plan.verify)] if plan.verify else [])


def _limit_facts(config: Config, plan: Plan) -> list[dict]:
    """[{"step", "field", "asked", "limit", "setting", "used"}]: each limit a plan asks
    above the user's, and the user's value that is used instead (narrowed)."""
    facts = []
    for sid, step in sorted(plan.steps.items()):
        if isinstance(step.max_retries, int) and step.max_retries > config.max_retries:
            facts.append({"step": sid, "field": "max_retries", "asked": step.max_retries,
                          "limit": config.max_retries, "setting": "--max-retries",
                          "used": config.max_retries})
        if isinstance(step.timeout_s, (int, float)):
            for limit, setting in ((config.timeout_s, "--timeout (per read)"),
                                   (DEFAULT_REQUEST_DEADLINE_S, "the request deadline")):
                if step.timeout_s > limit:
                    facts.append({"step": sid, "field": "timeout_s", "asked": step.timeout_s,
                                  "limit": limit, "setting": setting,
                                  "used": narrowed(step.timeout_s, limit)})
    return facts


###############################################################################
# 19. Model server replies: bounds, errors, streams
#
# What a model server sends back, read as untrusted input: its error messages and
# what they say about the server, usage counts, the parts of a reply, SSE and NDJSON
# streams, and the one tally every executor's reply is held to (--max-output-bytes).
###############################################################################


def reasoning_delta(delta: Any) -> str:
    """Return the reasoning text of one chat-completion delta (or message), "" if none:
    reasoning_content on llama.cpp's server (--reasoning-format auto), LM Studio
    (DeepSeek-R1, 0.3.9) and vLLM before PR #27752; reasoning on Ollama
    (openai/openai.go), LM Studio for gpt-oss (0.3.23) and vLLM since; both: once."""
    if not isinstance(delta, dict):
        return ""
    for key in ("reasoning_content", "reasoning"):
        value = delta.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


class OutputTally:
    """One reply as it streams, whatever reads it (SSE, NDJSON, Anthropic's or the claude
    CLI's events): take() counts each piece against limit (UTF-8 bytes, --max-output-bytes,
    answer and thinking alike; LLMProtocolError past it), keeps it and hands it to the
    request's on_delta or on_reasoning. received: the answer's pieces, "" for thinking (a
    request is never resent once output has streamed); thought: the thinking; *_bytes,
    *_pieces (about a token each); started: time.monotonic() when the reply was asked for."""

    def __init__(self, limit: int, request: "ChatRequest | None" = None):
        self.limit, self.started = limit, time.monotonic()
        self.on_delta = request.on_delta if request else None
        self.on_reasoning = request.on_reasoning if request else None
        self.answer_bytes = self.reasoning_bytes = self.answer_pieces = self.reasoning_pieces = 0
        self.received: list[str] = []
        self.thought: list[str] = []

    def _bytes_of(self, piece: str, thinking: bool) -> int:
        """piece's UTF-8 bytes; LLMProtocolError when the reply would pass the limit."""
        grown = len(piece.encode("utf-8", "surrogatepass"))
        if self.answer_bytes + self.reasoning_bytes + grown <= self.limit:
            return grown
        if not thinking:
            raise LLMProtocolError(f"the reply passed --max-output-bytes ({self.limit} bytes); "
                                   "cut", "raise --max-output-bytes or ask for less")
        raise LLMProtocolError(
            f"the reply passed --max-output-bytes ({self.limit} bytes) while the model was "
            f"thinking ({self.reasoning_bytes + grown} bytes of reasoning, {self.answer_bytes} "
            "of answer); cut",
            "ask the server not to think (the step's \"thinking\": \"off\") "
            "or raise --max-output-bytes")

    def add_answer(self, piece: str) -> None:
        """Count one piece of answer text."""
        self.answer_bytes += self._bytes_of(piece, False)
        self.answer_pieces += 1

    def add_reasoning(self, piece: str) -> None:
        """Count one piece of thinking text."""
        self.reasoning_bytes += self._bytes_of(piece, True)
        self.reasoning_pieces += 1


    def take(self, answer: str, reasoning: str = "") -> None:
        """Take one streamed piece of a reply, its thinking first."""
        if reasoning:
            self.add_reasoning(reasoning)
            self.thought.append(reasoning)
            self.received.append("")
            if self.on_reasoning:
                self.on_reasoning(reasoning)
        if answer:
            self.add_answer(answer)
            self.received.append(answer)
            if self.on_delta:
                self.on_delta(answer)

    @property
    def chars(self) -> int:
        """Characters of answer received so far."""
        return sum(map(len, self.received))

    def completion(self, usage: dict | None, model: str | None, finish: str | None,
                   cost_usd: float | None = 0.0) -> Completion:
        """Return the Completion of what was taken (see Completion for the fields)."""
        return Completion("".join(self.received), usage, model, finish,
                          time.monotonic() - self.started, cost_usd, "".join(self.thought),
                          self.reasoning_pieces)


def _error_message(body: bytes) -> str:
    """Pull the server's own message out of an error body: OpenAI's {"error": {"message"}},
    LM Studio's {"error": "…"}, vLLM's older flat {"message"}; else the text, one line."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = load_reply(text)
    except ValueError:
        return " ".join(clip(text, 300, "body").split()) or "(empty body)"
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        message = str(err.get("message") or json.dumps(err))
        kind = err.get("type") or err.get("code")
        if isinstance(kind, str) and kind not in message:
            message = f"{message} ({kind})"
    else:
        message = str(err)
    return " ".join(message.split())     # one line, whatever the server sent


_OVERFLOW_MARKERS = ("exceed_context_size_error", "context_length_exceeded",
                     "maximum context length",
                     "context length", "n_keep", "context size", "does not fit in context")


def _is_context_overflow(message: str) -> bool:
    lower = message.lower()
    return any(marker in lower for marker in _OVERFLOW_MARKERS)


# Server-level failures (LLMServerUnusable), by what the server says: (pattern of its
# message, lower case; the hint, formatted with the model name the message quotes).
SERVER_FAULTS = (
    # LM Studio with JIT off or failing: 404 "No models loaded. Please load a model in the
    # developer page or use the 'lms load' command." (lmstudio-ai/lms#107, bug tracker #1730)
    (r"no models loaded", "load one: lms load KEY (LM Studio's Developer page), or pass --model"),
    # Ollama: 404 `model "x" not found, try pulling it first` (ollama server/routes.go)
    (r"model [\"']?([^\"'\s]*)[\"']? not found, try pulling it first", "ollama pull {0}, or pick "
     "another with --model (bridge --health lists them)"),
    # Ollama: 400 `"x" does not support chat` for an embedding model (ollama server/routes.go)
    (r"[\"']?([^\"'\s]*)[\"']? does not support chat",
     "{0} is not a chat model; pick one with --model (bridge --health lists the chat models)"),
    # LM Studio: 404 `Failed to load model "X". Error: … insufficient system resources`
    # (agent-zero#215), 400 "… Operation canceled" (crush#2546)
    (r"failed to load model [\"']?([^\"'\s]*)", "free memory, or load it yourself with a smaller "
     "context: lms load {0} --context-length 8192"),
    # LM Studio with two or more models loaded: 404 model_not_found (lmstudio-bug-tracker#619)
    (r"model [\"']?([^\"'\s]*)[\"']? not found",
     "load it (lms load {0}) or pass --model with one the server has (bridge --health lists them)"),
)


def server_fault(status: int, message: str, key_given: bool) -> tuple[str, str] | None:
    """Return (what, hint) when an HTTP error is about the model server, not the step
    (LLMServerUnusable), else None. message: the server's (_error_message); key_given: a
    key was sent. 401/403: LM Studio's "Require Authentication" (invalid_api_key:
    opencode-lmstudio#41), llama-server and vLLM --api-key."""
    if status in (401, 403):
        if key_given:
            return ("the model server refused the key", "set BRIDGE_API_KEY (or --api-key) to the "
                    "key the server expects (LM Studio: Developer > Server settings)")
        return ("the model server wants a key", "set BRIDGE_API_KEY (or pass --api-key) to its key "
                "(LM Studio: Developer > Server settings > Require Authentication)")
    if status not in (400, 404, 500):
        return None
    for pattern, hint in SERVER_FAULTS:
        if found := re.search(pattern, message.lower()):
            name = re.search(pattern, message, re.IGNORECASE)
            groups = name.groups() if name else found.groups()
            return ("the model server cannot run the model",
                    hint.format(*(g or "MODEL" for g in groups)))
    return None


def _retry_after_s(value: str | None) -> float | None:
    """Parse a Retry-After header (seconds or an HTTP date) into seconds, or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def usage_count(value: Any) -> int | None:
    """Return a token count a server reported when an int from 0 to USAGE_MAX_TOKENS, else
    None, estimated (a negative count must not lower a run's spend, nor 10**400 overflow
    a price)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= USAGE_MAX_TOKENS:
        return value
    return None


def checked_usage(prompt: Any, completion: Any) -> dict | None:
    """{"prompt_tokens", "completion_tokens"} when both pass usage_count, else None."""
    prompt, completion = usage_count(prompt), usage_count(completion)
    if prompt is None or completion is None:
        return None
    return {"prompt_tokens": prompt, "completion_tokens": completion}


def reported_cost_usd(value: Any, most: float) -> float | None:
    """A cost an executor reported (US dollars) when a number from 0 to most, else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= most:
        return float(value)
    return None


def reply_object(value: Any, what: str, url: str) -> dict:
    """A part of a reply that must be an object ({} when None); LLMProtocolError naming
    what (e.g. "a chunk's delta") for anything else."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LLMProtocolError(f"{url} sent {what} that is not an object: "
                               f"{clip(repr(value), 80, 'value')}")
    return value


def reply_text(value: Any, what: str, url: str) -> str:
    """A part of a reply that must be text ("" when None); LLMProtocolError naming what
    for anything else."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise LLMProtocolError(f"{url} sent {what} that is not a string: "
                               f"{clip(repr(value), 80, 'value')}")
    return value


def reply_label(value: Any) -> str | None:
    """A label a server sent (model, finish_reason) clipped to 200 characters; None for
    anything but a str (ignored, as when absent)."""
    return value[:200] if isinstance(value, str) and value else None


def chunk_choice(chunk: dict, url: str) -> tuple[dict, str | None] | None:
    """Return (delta, finish_reason) of a chat.completion.chunk's first choice, or None
    when choices is empty (the usage chunk). Raises LLMProtocolError for a malformed one."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise LLMProtocolError(f"{url} streamed a chunk without 'choices'")
    if not choices:
        return None
    if not isinstance(choices[0], dict):
        raise LLMProtocolError(f"{url} streamed a choice that is not an object: "
                               f"{clip(repr(choices[0]), 80, 'value')}")
    choice = choices[0]
    delta = reply_object(choice.get("delta"), "a chunk's delta", url)
    return delta, reply_label(choice.get("finish_reason"))


def streamed_json(text: str, what: str, url: str) -> Any:
    """Parse one streamed piece (what: "event", "line") as JSON; else LLMProtocolError."""
    try:
        return load_reply(text)
    except ValueError as exc:
        article = "an" if what[0] in "aeiou" else "a"
        raise LLMProtocolError(f"{url} streamed {article} {what} that is not JSON: "
                               f"{clip(text, 120, what)}") from exc


def _iter_raw_lines(chunks: Iterator[bytes], max_bytes: int,
                    tail: bool) -> Iterator[bytes]:
    """Yield the lines of a byte stream without line breaks (and the rest after the last
    when tail). Raises LLMProtocolError past max_bytes without a break: memory stays bounded."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        if len(buffer) > max_bytes and b"\n" not in buffer:
            raise LLMProtocolError(f"the server sent a line longer than {max_bytes} bytes")
        *lines, buffer = buffer.split(b"\n")
        yield from lines
    if tail and buffer:
        yield buffer


def _iter_sse(chunks: Iterator[bytes], max_bytes: int) -> Iterator[tuple[str, str]]:
    """Yield (event, data) pairs from a server-sent-events byte stream (comment lines
    such as ": ping" skipped); lines bounded as _iter_raw_lines says."""
    event, data = "message", []
    for raw in _iter_raw_lines(chunks, max_bytes, tail=False):
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
    if data:
        yield event, "\n".join(data)


def _iter_lines(chunks: Iterator[bytes], max_bytes: int) -> Iterator[str]:
    """Yield the non-blank lines of an NDJSON byte stream (Ollama's native API); lines
    bounded as _iter_raw_lines says."""
    for raw in _iter_raw_lines(chunks, max_bytes, tail=True):
        if raw.strip():
            yield raw.decode("utf-8", "replace")


class BoundedResponse:
    """An httpx streaming response read within bounds: iter_bytes() raises LLMDeadline
    past the deadline (time.monotonic() seconds), checked as each chunk arrives (a silent
    server is cut by --timeout instead); read(max_bytes) stops past max_bytes. limit: the
    deadline in words, e.g. "0.5 s (the step's timeout_s)"."""

    def __init__(self, response: Any, url: str, deadline: float, limit: str):
        self.response, self.url, self.deadline, self.limit = response, url, deadline, limit
        self.headers, self.status_code = response.headers, response.status_code

    def iter_bytes(self) -> Iterator[bytes]:
        """Yield the body's chunks; raise LLMDeadline past the deadline."""
        for chunk in self.response.iter_bytes():
            if time.monotonic() > self.deadline:
                raise LLMDeadline(f"the request to {self.url} passed its deadline of {self.limit} "
                                  "while the server kept sending; stopped",
                                  "raise the step's timeout_s, or check the server: it sent "
                                  "without finishing")
            yield chunk

    def read(self, max_bytes: int, cut: bool = False) -> bytes:
        """Return the body; past max_bytes, with cut its first max_bytes, else
        LLMProtocolError."""
        body = b""
        for chunk in self.iter_bytes():
            body += chunk
            if len(body) > max_bytes:
                if cut:
                    return body[:max_bytes]
                raise LLMProtocolError(f"the reply from {self.url} passed {max_bytes} bytes "
                                       f"(--max-output-bytes and {RESPONSE_ENVELOPE_BYTES} for "
                                       "its JSON); cut",
                                       "raise --max-output-bytes or ask for less")
        return body


def _positive(value: Any) -> int | None:
    """value when a positive int up to USAGE_MAX_TOKENS, else None (10**400 is not said)."""
    return value if usage_count(value) and value > 0 else None


def _usage(value: Any) -> dict | None:
    """checked_usage of an OpenAI usage object, or None when there is none."""

    if not isinstance(value, dict):
        return None
    return checked_usage(value.get("prompt_tokens"), value.get("completion_tokens"))


###############################################################################
# 20. HTTP executors: requests and retries
#
# Chat requests over HTTP (the OpenAI wire format of LM Studio, Ollama, llama.cpp's
# server and vLLM, and Anthropic's), what each kind of server takes, and the retry loop.
# Every httpx exception is translated to an LLMError.
###############################################################################


RESPONSE_FORMS: tuple[Callable[[dict], dict], ...] = (
    # OpenAI's form: LM Studio, llama.cpp's llama-server, vLLM and Ollama accept it
    # (lmstudio.ai/docs/developer/openai-compat/structured-output; llama.cpp
    # tools/server/README.md; vllm protocol.py; ollama openai/openai.go).
    lambda schema: {"type": "json_schema",
                    "json_schema": {"name": "step_output", "schema": schema}},
    # llama-cpp-python's form (llama_cpp/llama_types.py); LM Studio 400s on it.
    lambda schema: {"type": "json_object", "schema": schema},
)


# The form of RESPONSE_FORMS a kind of server (ServerInfo.kind) is sent first:
# llama-cpp-python takes only its own ("text" | "json_object", llama_cpp/llama_types.py)
# and answers json_schema with HTTP 500.
FIRST_RESPONSE_FORM = {"llama-cpp-python": 1}


# Sampling fields beyond OpenAI's (temperature, seed) that each kind of server takes
# (ServerInfo.kind); bridge sends them only there (see LLMClient.accepted_sampling).
SAMPLING_FIELDS = {
    "Ollama": ("repeat_penalty",),                          # its options (docs/api.md, Modelfile)
    "llama.cpp": ("repeat_penalty", "dry_multiplier"),      # llama.cpp tools/server/README.md
    # lmstudio docs 1_developer/3_openai-compat/chat-completions.md
    "LM Studio": ("repeat_penalty",),
    # llama_cpp/server/types.py (no DRY; unknown fields ignored)
    "llama-cpp-python": ("repeat_penalty",),
}


# The fields that ask a server not to think (a step's thinking "off"), by ServerInfo.kind;
# a kind not listed gets THINKING_OFF_DEFAULT; a field refused (HTTP 400/422 naming it)
# is not sent again (LLMClient.thinking_fields).
THINKING_OFF_FIELDS: dict[str, dict] = {
    # reasoning_effort "none" on /v1/chat/completions: LM Studio 0.4.17 (bug tracker #2057)
    "LM Studio": {"reasoning_effort": "none"},
    # the OpenAI layer maps reasoning_effort "none" to think false: ollama openai/openai.go
    # (since v0.11.5), docs/api/openai-compatibility.mdx
    "Ollama": {"reasoning_effort": "none"},
    # either one: ggml-org/llama.cpp tools/server/README.md (reasoning_effort,
    # chat_template_kwargs); the template reads enable_thinking (Qwen3-style)
    "llama.cpp": {"reasoning_effort": "none", "chat_template_kwargs": {"enable_thinking": False}},
    # Qwen3-style templates through chat_template_kwargs (vllm docs, reasoning outputs)
    "vLLM": {"chat_template_kwargs": {"enable_thinking": False}},
    # no reasoning parser: a model's thinking arrives in content, and split_reasoning takes it out
    "llama-cpp-python": {},
}
THINKING_OFF_DEFAULT = {"reasoning_effort": "none",
                        "chat_template_kwargs": {"enable_thinking": False}}


def _refuses_response_format(exc: LLMError) -> bool:
    """Tell whether an error is the server refusing our response_format: LM Studio's 400
    "'response_format.type' must be 'json_schema'", llama-cpp-python's 500 naming 'text'
    or 'json_object'."""
    status = getattr(exc, "status", None)
    text = str(exc).lower()
    words = ("response_format", "json_schema", "json_object", "'text'", "grammar")
    return status in (400, 422, 500) and not exc.context_overflow and any(
        word in text for word in words)


def missing_v1_hint(base_url: str, status: int) -> str:
    """"; … try --base-url …/v1" for an HTTP 404 from a base URL whose path has no /v1
    (LM Studio, Ollama, llama.cpp's server and vLLM all serve under /v1), else ""."""
    path = urlsplit(base_url).path
    if status != 404 or "/v1" in path:
        return ""
    if path.strip("/"):
        return ("; the base URL of an OpenAI-compatible server ends in /v1 as a rule: "
                "check --base-url")
    return f"; OpenAI-compatible servers answer under /v1: try --base-url {base_url.rstrip('/')}/v1"


class HTTPExecutor(Executor):
    """What every HTTP executor shares: one httpx.Client built from Config, httpx
    exceptions as LLMError, and the retry loop: transient failures (refused or reset,
    timeouts, 429, 500, 502, 503, 504, 529) are retried up to config.retries times,
    backing off from config.retry_delay_s seconds with jitter, honouring Retry-After,
    never past RETRY_BUDGET_S seconds in all, never once output has streamed. sleep is
    injectable. A subclass gives CHAT_PATH, chat() and _parse()."""

    key: str | None = None      # the secret its headers carry, never shown (_scrub)

    def __init__(self, config: Config, base_url: str, *, headers: dict | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 on_retry: Callable[[str], None] | None = None):
        import httpx        # the room's one import of it, kept as self._httpx

        self._httpx = httpx
        self.config = config
        self.base_url = base_url.rstrip("/")
        self._sleep = sleep
        self._on_retry = on_retry or (lambda message: None)
        timeout = httpx.Timeout(config.timeout_s,
                                connect=min(CONNECT_TIMEOUT_S, config.timeout_s))
        # trust_env=False: a proxy set in the user's shell must not see loopback traffic.
        # A plain-http server needs no TLS context, and building one (certifi's CA
        # bundle) costs ~80 ms of start-up; https keeps full verification.
        https = self.base_url.lower().startswith("https://")
        self.http = httpx.Client(timeout=timeout, trust_env=False, verify=https,
                                 headers=headers)

    def close(self) -> None:
        """Close the connections."""
        self.http.close()

    def _get_json(self, url: str) -> Any:
        """GET url and return its JSON body, within BoundedResponse's bounds (at least
        DEFAULT_MAX_OUTPUT_BYTES: a lower --max-output-bytes cuts replies, not the model
        list). Raises LLMError."""
        limit = f"{DEFAULT_REQUEST_DEADLINE_S:g} s (bridge's default)"
        try:
            with self.http.stream("GET", url) as raw:
                response = BoundedResponse(raw, url, time.monotonic() + DEFAULT_REQUEST_DEADLINE_S,
                                           limit)
                if response.status_code >= 400:
                    raise self._http_error(response, url, missing_v1_hint(
                        self.base_url, response.status_code))
                limit_bytes = max(self.config.max_output_bytes, DEFAULT_MAX_OUTPUT_BYTES)
                body = response.read(limit_bytes + RESPONSE_ENVELOPE_BYTES)
        except self._httpx.TransportError as exc:
            raise self._transport_error(exc, url) from exc
        try:
            return load_reply(body)
        except ValueError as exc:
            raise LLMProtocolError(f"{url} answered with a body that is not JSON") from exc

    def _scrub(self, text: str) -> str:
        """A server's message without the key this client sends (a server may echo it)."""
        return text.replace(self.key, "[the key]") if self.key else text

    def _http_error(self, response: BoundedResponse, url: str, hint: str = "") -> LLMError:
        """The error of an HTTP status >= 400: the server's message (scrubbed) and hint,
        raised as LLMServerUnusable when about the server (_raise_fault), else returned as
        LLMHTTPError with its Retry-After."""
        message = self._scrub(_error_message(response.read(ERROR_BODY_MAX_BYTES, cut=True)))
        self._raise_fault(url, response.status_code, message)
        return LLMHTTPError(f"{url} answered HTTP {response.status_code}: {message}{hint}",
                            response.status_code,
                            retry_after_s=_retry_after_s(response.headers.get("retry-after")),
                            context_overflow=_is_context_overflow(message))

    def _stream_error(self, url: str, data: str) -> LLMError:
        """The error a server reported inside a 200 stream (an SSE "error" event, an NDJSON
        {"error"} line), as _http_error treats one."""

        message = self._scrub(_error_message(data.encode()))
        self._raise_fault(url, 500, message)
        return LLMHTTPError(f"{url} reported an error mid-stream: {message}", 200,
                            context_overflow=_is_context_overflow(message))

    def _raise_fault(self, url: str, status: int, message: str) -> None:
        """Raise LLMServerUnusable when an HTTP error is about the server, not the request
        (the local client: server_fault); here, nothing is."""

    def _gave_up(self, exc: LLMError, started: float, retries: int) -> LLMError:
        """Return the error a request raises once its retries are spent on exc."""
        return exc

    def _send_with_retries(self, payload: dict, request: ChatRequest) -> Completion:
        started = time.monotonic()
        deadline = started + RETRY_BUDGET_S
        for retry in range(self.config.retries + 1):
            tally = OutputTally(self.config.max_output_bytes, request)
            try:
                return self._stream_once(payload, request.timeout_s, tally)
            except LLMError as exc:
                if exc.transient and not tally.received and retry == self.config.retries:
                    raise self._gave_up(exc, started, retry) from exc
                if not exc.transient or tally.received or retry == self.config.retries \
                        or exc.context_overflow \
                        or ("response_format" in payload and _refuses_response_format(exc)):
                    raise       # an overflow (llama.cpp's 500 "Context size has been exceeded") too
                delay = exc.retry_after_s
                if delay is None:
                    delay = min(RETRY_MAX_DELAY_S, self.config.retry_delay_s * 2 ** retry)
                    import random

                    delay *= random.uniform(0.5, 1.0)   # jitter: clients retrying together spread
                if time.monotonic() + delay > deadline:
                    exc.args = (f"{exc} (a retry in {delay:.0f} s would pass the "
                                f"{RETRY_BUDGET_S:.0f} s retry budget)",)
                    raise self._gave_up(exc, started, retry) from exc
                self._on_retry(f"{exc}; retry {retry + 1}/{self.config.retries} in {delay:.1f} s")
                self._sleep(delay)
        raise AssertionError("unreachable")

    def _transport_error(self, exc: Exception, url: str) -> LLMError:
        """Translate an httpx transport exception into the matching LLMError."""
        httpx = self._httpx
        if isinstance(exc, httpx.ConnectTimeout):
            connect_s = min(CONNECT_TIMEOUT_S, self.config.timeout_s)
            return LLMTimeout(f"no connection to {url} within {connect_s:g} s "
                              f"(bridge's connect timeout) ({type(exc).__name__})",
                              "check that the server is up and answering at --base-url")
        if isinstance(exc, httpx.TimeoutException):
            return LLMTimeout(f"no answer from {url} within {self.config.timeout_s:g} s "
                              f"(--timeout, for each chunk) ({type(exc).__name__})",
                              "a model may still be loading; raise --timeout or load it first")
        if isinstance(exc, (httpx.ConnectError, httpx.ReadError, httpx.WriteError,
                            httpx.RemoteProtocolError, httpx.CloseError)):
            reason = str(exc) or type(exc).__name__
            return LLMUnavailable(f"cannot reach the model server at {self.base_url} "
                                  f"({reason}, requesting {url})",    # the URL the user gave
                                  "start the server (LM Studio: Developer > Start server) "
                                  "or pass --base-url")
        return LLMProtocolError(f"request to {url} failed: {type(exc).__name__}: {exc}")

    def _stream_once(self, payload: dict, timeout_s: float | None,
                     tally: OutputTally) -> Completion:
        """POST payload once; read the reply into tally (_parse). timeout_s: the step's
        (ChatRequest.timeout_s). Raises LLMError."""
        httpx = self._httpx
        url = f"{self.base_url}{self.CHAT_PATH}"
        started = tally.started
        kwargs: dict[str, Any] = {"json": payload}
        if timeout_s is not None:   # a plan only narrows: --timeout per read, the default deadline
            read_s = narrowed(timeout_s, self.config.timeout_s)
            kwargs["timeout"] = httpx.Timeout(read_s, connect=min(CONNECT_TIMEOUT_S, read_s))
        deadline_s = narrowed(timeout_s, DEFAULT_REQUEST_DEADLINE_S)
        source = "the step's timeout_s" if deadline_s != DEFAULT_REQUEST_DEADLINE_S \
            else "bridge's default; a step's lower timeout_s sets its own"
        limit = f"{deadline_s:g} s ({source})"
        try:
            with self.http.stream("POST", url, **kwargs) as raw:
                response = BoundedResponse(raw, url, started + deadline_s, limit)
                if response.status_code >= 400:
                    raise self._http_error(response, url)
                return self._parse(response, url, tally)
        except httpx.TransportError as exc:
            error = self._transport_error(exc, url)
            if timeout_s is not None and narrowed(timeout_s, self.config.timeout_s) >= deadline_s \
                    and isinstance(error, LLMTimeout) and not isinstance(exc, httpx.ConnectTimeout):
                # the step's timeout_s, under --timeout, is its read timeout and its deadline
                # alike: a wait for a byte that long passed the deadline, as a retry would
                error = LLMDeadline(f"no answer from {url} within {limit}: its deadline passed "
                                    f"({type(exc).__name__}); not retried",
                                    "raise the step's timeout_s, or check what keeps the server")
            if tally.received:  # the server was reached: say how the stream ended
                stalled = isinstance(error, LLMTimeout)
                why = error if stalled else str(exc) or type(exc).__name__
                error = LLMProtocolError(f"the stream from {url} "
                                         f"{'stalled' if stalled else 'ended early'} "
                                         f"after {tally.chars} characters ({why})")
            raise error from exc


###############################################################################
# 21. Model server probes: what a server runs
#
# LM Studio's, Ollama's, llama.cpp's and vLLM's own routes, asked once a run: the
# model, its context, its slots (ServerInfo); the search for a server on the default
# ports when no --base-url was given (discover_server), and the model a run takes.
###############################################################################


class ServerInfo(namedtuple("ServerInfo", "kind models loaded context_length parallel version why "
                                         "refused problem trained_context",
                            defaults=(None,) * 5 + ((), None, None))):
    """What a server says about itself (LLMClient.probe): kind ("LM Studio", "llama.cpp",
    "Ollama", "OpenAI-compatible"), models (ids), loaded (the loaded model's id, or None),
    context_length (tokens per request), parallel (requests served at once), version
    (str), why (how loaded was picked), refused ((model, reason) pairs no step is sent
    to), problem ((what, hint) when no model can be used), trained_context (tokens); None
    where not said."""

    __slots__ = ()


def _ollama_named(found: Any) -> dict[str, dict]:
    """{name: entry} of an /api/tags or /api/ps answer's models ({} when it has none)."""
    found = found.get("models") if isinstance(found, dict) else None
    return {m["name"]: m for m in found if isinstance(m, dict)
            and isinstance(m.get("name"), str)} if isinstance(found, list) else {}


class OllamaModels:
    """The models one Ollama probe sees: pulled (/api/tags) and running (/api/ps), by
    name; shown, the /api/show answers (at most OLLAMA_SHOW_MAX); refused, the (name,
    reason) pairs no step is sent to: no "completion" in /api/show capabilities
    (embedding models), cloud models (a *-cloud name or /api/tags remote_host: they run
    on ollama.com, docs/cloud.mdx) unless --allow-executor ollama-cloud."""

    __slots__ = ("client", "root", "pulled", "running", "shown", "refused")

    def __init__(self, client: Any, root: str, tags: Any, ps: Any):
        self.client, self.root = client, root
        self.pulled, self.running = _ollama_named(tags), _ollama_named(ps)
        self.shown: dict[str, dict] = {}
        self.refused: list[tuple[str, str]] = []

    def show(self, name: str) -> dict:
        """POST /api/show for name, once; {} when refused or past OLLAMA_SHOW_MAX."""
        if name not in self.shown:
            info = self.client._post_json(f"{self.root}/api/show", {"model": name}) \
                if len(self.shown) < OLLAMA_SHOW_MAX else None
            self.shown[name] = info if isinstance(info, dict) else {}
        return self.shown[name]

    def cloud(self, name: str) -> bool:
        """Whether name is a cloud model the user has not allowed (--allow-executor)."""
        if "ollama-cloud" in self.client.config.allowed_executors:
            return False
        remote = (self.pulled.get(name) or self.running.get(name) or {}).get("remote_host")
        return is_cloud_model(name) or bool(remote)

    def refusal(self, name: str) -> str | None:
        """Why no step goes to name, or None."""
        if self.cloud(name):
            return ("a cloud model: it runs on ollama.com, and the project's files would "
                    "leave this machine")
        caps = self.show(name).get("capabilities")
        if isinstance(caps, list) and "completion" not in caps:
            return f"not a chat model (capabilities: {', '.join(map(str, caps)) or 'none'})"
        return None

    def wanted(self, wanted: str) -> tuple:
        """(chosen, why, problem) for --model wanted: pulled, able to chat, not cloud."""
        name = next((n for n in (wanted, f"{wanted}:latest")
                     if n in self.pulled or n in self.running), None)
        if name is None:
            return None, None, (f"model {wanted!r} is not pulled on this Ollama",
                                f"ollama pull {wanted}")
        if reason := self.refusal(name):
            self.refused.append((name, reason))
            return None, None, (f"--model {name} is {reason}", "pick a local chat model with "
                                "--model (bridge --health lists them)")
        return name, "--model", None

    def loaded(self) -> tuple:
        """(chosen, why, problem) without --model: the first running chat model, else the
        only one pulled."""
        chosen = None
        for name in self.running:
            if reason := self.refusal(name):
                self.refused.append((name, reason))
            elif chosen is None:
                chosen = name
        if chosen is not None:
            return chosen, "loaded: Ollama /api/ps", None
        chat = []
        for name in self.pulled:
            if name in self.running:
                continue
            if reason := self.refusal(name):
                self.refused.append((name, reason))
            else:
                chat.append(name)
        if len(chat) == 1:
            return chat[0], "the only chat model pulled (none is loaded)", None
        if not chat:
            return None, None, ("this Ollama has no local chat model",
                                "pull one: ollama pull llama3.1:8b")
        return None, None, (f"no model is loaded and {len(chat)} chat models are pulled: "
                            f"{', '.join(chat[:8])}",
                            "pick one with --model NAME (or load one: ollama run NAME)")

    def refuse_cloud(self) -> None:
        """List the cloud models pulled, without a question to the server."""
        listed = {name for name, _ in self.refused}
        for name in self.pulled:
            if name not in listed and self.cloud(name):
                self.refused.append((name, self.refusal(name)))


class ServerProbes:
    """LLMClient's probes (a mixin of HTTPExecutor's): probe, count_tokens."""

    CHAT_PATH = "/chat/completions"     # OpenAI's; Ollama's native API has its own

    def _wanted(self) -> str | None:
        """The model --model names on this server (its openai: name), or None."""
        prefix, name = parse_model_ref(self.config.model or "")
        return name if self.config.model and prefix == self.PREFIX else None

    def _model_entries(self) -> list[dict]:
        data = self._get_json(f"{self.base_url}/models")
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list):
            raise LLMProtocolError(f"{self.base_url}/models did not list models (no 'data' array)")
        return [m for m in models if isinstance(m, dict) and isinstance(m.get("id"), str)]

    def _try_json(self, url: str) -> Any:
        """GET url as JSON; None when the route is missing or answers something else."""
        try:
            return self._get_json(url)
        except (LLMHTTPError, LLMProtocolError):
            return None

    def count_tokens(self, messages: list[dict]) -> int | None:
        """Count messages' tokens with the server's tokenizer where it has one:
        llama-cpp-python POST /extras/tokenize/count {"input"} -> {"count"}
        (llama_cpp/server/app.py), llama.cpp POST /tokenize {"content"} -> {"tokens"}
        (tools/server/README.md); plus 5 a message, as estimate_tokens adds. None
        elsewhere, or once the route failed."""
        if self.server_kind not in ("llama-cpp-python", "llama.cpp") or self.tokenizer_refused:
            return None
        text = "\n".join(m["content"] for m in messages)
        root = self.base_url.removesuffix("/v1")
        try:
            if self.server_kind == "llama-cpp-python":
                found = self._post_json(f"{root}/extras/tokenize/count", {"input": text})
                count = found.get("count") if isinstance(found, dict) else None
            else:
                found = self._post_json(f"{root}/tokenize", {"content": text})
                tokens = found.get("tokens") if isinstance(found, dict) else None
                count = len(tokens) if isinstance(tokens, list) else None
        except LLMError:
            count = None
        if _positive(count) is None:
            self.tokenizer_refused = True
            return None
        return count + 5 * len(messages) + 3

    def _post_json(self, url: str, body: dict) -> Any:
        """POST body as JSON to url; return the JSON reply, or None when the route refuses
        or answers something else. Raises LLMError when the server cannot be reached."""
        limit = f"{DEFAULT_REQUEST_DEADLINE_S:g} s (bridge's default)"
        try:
            with self.http.stream("POST", url, json=body,
                                  timeout=min(self.config.timeout_s, 30.0)) as raw:
                response = BoundedResponse(raw, url, time.monotonic() + DEFAULT_REQUEST_DEADLINE_S,
                                           limit)
                if response.status_code >= 400:
                    return None
                content = response.read(DEFAULT_MAX_OUTPUT_BYTES)
        except self._httpx.TransportError as exc:
            raise self._transport_error(exc, url) from exc
        except LLMProtocolError:        # past the bound: not an answer to use
            return None
        try:
            return load_reply(content)
        except ValueError:
            return None

    def _lmstudio_models(self, models: list[str], entries: list[dict]) -> "ServerInfo":
        """Read LM Studio 0.4's GET /api/v1/models (lmstudio docs 1_developer/2_rest/
        list.md): type "llm" and "vlm" entries are chat models (a loaded "embedding" one is
        refused); --model matches an entry's key or a loaded instance's id, whose config
        gives context and parallel. Nothing loaded, no --model: the only LLM downloaded (JIT
        loads it on the first request), else a problem listing the LLMs."""
        chat = [e for e in entries     # an entry saying no type is taken for an LLM
                if e.get("type", "llm") in ("llm", "vlm") and isinstance(e.get("key"), str)]
        refused = tuple((str(e.get("key"))[:200], f"not a chat model (type {e.get('type')!r})")
                        for e in entries
                        if e.get("type", "llm") not in ("llm", "vlm") and e.get("loaded_instances"))
        wanted = self._wanted()

        def instances(entry: dict) -> list[dict]:
            found = entry.get("loaded_instances")
            return [i for i in found if isinstance(i, dict)] if isinstance(found, list) else []
        for entry in chat:
            trained = _positive(entry.get("max_context_length"))
            for instance in instances(entry):
                if wanted is None or wanted in (entry["key"], instance.get("id")):
                    config = instance.get("config")
                    config = config if isinstance(config, dict) else {}
                    why = "--model" if wanted else "loaded: LM Studio /api/v1/models"
                    return ServerInfo("LM Studio", models, reply_label(wanted or entry["key"]),
                                      _positive(config.get("context_length")),
                                      _positive(config.get("parallel")), None, why, refused,
                                      None, trained)
        if wanted is not None:      # not loaded: the first request loads it (JIT), then re-read
            return ServerInfo("LM Studio", models, refused=refused,
                              why="--model, not loaded yet: LM Studio loads it on the first "
                              "request")
        if not chat:                # nothing bridge can read as an LLM: --model decides
            return ServerInfo("LM Studio", models, refused=refused)
        if len(chat) == 1:
            return ServerInfo("LM Studio", models, reply_label(chat[0]["key"]), None, None, None,
                              "the only LLM downloaded; LM Studio loads it on the first request",
                              refused, None, _positive(chat[0].get("max_context_length")))
        listed = ", ".join(e["key"] for e in chat[:8]) or "none"
        return ServerInfo("LM Studio", models, refused=refused, problem=(
            f"LM Studio has no model loaded and {len(chat)} LLMs downloaded ({listed})",
            "load one (lms load KEY) or pass --model KEY"))


    def _ollama_probe(self, root: str) -> "ServerInfo | None":
        """Return what an Ollama server runs (OllamaModels), or None when root is not
        Ollama (GET /api/version and /api/tags, docs/api.md). Context: /api/ps
        context_length (loaded), /api/show model_info["<arch>.context_length"] (trained).
        Steps go to /api/chat with --ollama-api native (the default), else /v1."""
        version = self._try_json(f"{root}/api/version")
        tags = self._try_json(f"{root}/api/tags") if isinstance(version, dict) else None
        if not isinstance(tags, dict) or not isinstance(tags.get("models"), list) \
                or not isinstance(version.get("version"), str):
            return None
        models = OllamaModels(self, root, tags, self._try_json(f"{root}/api/ps"))
        wanted = self._wanted()
        chosen, why, problem = models.wanted(wanted) if wanted else models.loaded()
        models.refuse_cloud()
        trained = loaded_context = None
        if chosen is not None:
            info = models.show(chosen).get("model_info")
            if isinstance(info, dict):
                trained = next((_positive(v) for k, v in info.items() if isinstance(k, str)
                                and k.endswith(".context_length") and _positive(v)), None)
            loaded_context = _positive((models.running.get(chosen) or {}).get("context_length"))
        self.native = self.config.ollama_api == "native"
        self.base_url = root if self.native else f"{root}/v1"
        self.CHAT_PATH = "/api/chat" if self.native else ServerProbes.CHAT_PATH
        return ServerInfo("Ollama", list(models.pulled), chosen, loaded_context, None,
                          version["version"], why, tuple(models.refused), problem, trained)

    def probe(self) -> "ServerInfo":
        """Ask the server what it runs (ServerInfo). Sources, in order: Ollama
        (_ollama_probe); LM Studio 0.4 GET /api/v1/models (loaded_instances
        [].config.context_length and .parallel; lmstudio docs 1_developer/2_rest/
        list.md); LM Studio GET /api/v0/models (state "loaded", loaded_context_length
        or max_context_length); llama.cpp's GET /props (default_generation_settings.
        n_ctx, total_slots; tools/server/README.md); llama-cpp-python's /v1/models
        (owned_by "me"; llama_cpp/server/app.py); vLLM's max_model_len in
        /v1/models (vllm protocol.py); else the first of /v1/models. Raises LLMError
        when the server cannot be reached."""
        ollama = self._ollama_probe(self.base_url.removesuffix("/v1"))
        if ollama is not None:
            return ollama
        entries = self._model_entries()
        models = [m["id"] for m in entries]
        first = models[0] if models else None
        root = self.base_url.removesuffix("/v1")
        v1 = self._try_json(f"{root}/api/v1/models")
        if isinstance(v1, dict) and isinstance(v1.get("models"), list):
            return self._lmstudio_models(models, [e for e in v1["models"] if isinstance(e, dict)])
        v0 = self._try_json(f"{root}/api/v0/models")
        if isinstance(v0, dict) and isinstance(v0.get("data"), list):
            for entry in v0["data"]:
                if isinstance(entry, dict) and entry.get("state") == "loaded":
                    context = entry.get("loaded_context_length") or entry.get("max_context_length")
                    return ServerInfo("LM Studio", models, reply_label(entry.get("id")),
                                      _positive(context), None)
            return ServerInfo("LM Studio", models)
        props = self._try_json(f"{root}/props")
        if isinstance(props, dict) and ("total_slots" in props
                                        or "default_generation_settings" in props):
            settings = props.get("default_generation_settings")
            settings = settings if isinstance(settings, dict) else {}
            return ServerInfo("llama.cpp", models, first, _positive(settings.get("n_ctx")),
                              _positive(props.get("total_slots")))
        # llama-cpp-python: llama_cpp/server/app.py get_models
        if entries and all(m.get("owned_by") == "me" for m in entries):
            return ServerInfo("llama-cpp-python", models, first)

        return ServerInfo("OpenAI-compatible", models, first,
                          _positive(entries[0].get("max_model_len")) if entries else None, None)


def discover_server(config: Config) -> tuple[Config, list[dict]]:
    """Find the model server when no base URL was given: the first of
    DEFAULT_SERVER_PORTS on 127.0.0.1 that answers as one (GET /api/version with a
    version: Ollama; else GET /v1/models with a data list; 401/403: one wanting a key,
    which is not sent while looking). A port whose GET /api/health answers as
    mcp-memory-service does ({"status": "healthy"}; web/api/health.py), or --memory-url's,
    is never taken. Returns (the config, with the base URL found; [{"url", "result"}] per
    port tried)."""
    if config.base_url_given:
        return config, []
    import httpx

    memory_port = urlsplit(config.memory_url).port if config.memory_url else None
    tried = []
    with httpx.Client(timeout=DISCOVER_TIMEOUT_S, trust_env=False) as http:
        for port, suffix in DEFAULT_SERVER_PORTS:
            root = f"http://127.0.0.1:{port}"

            def get(path: str) -> Any:
                try:
                    response = http.get(root + path)
                    if response.status_code in (401, 403):
                        return {"data": []}         # a model server that wants its key
                    return load_reply(response.content) if response.status_code == 200 else None
                except (httpx.HTTPError, ValueError):
                    return None
            if port == memory_port:
                tried.append({"url": root,
                              "result": "--memory-url's port: the memory server, skipped"})
                continue
            try:
                http.get(root + "/")
            except httpx.HTTPError:
                tried.append({"url": root, "result": "nothing answers"})
                continue
            version, models = get("/api/version"), None
            if not (isinstance(version, dict) and isinstance(version.get("version"), str)):
                models = get("/v1/models")
                if not (isinstance(models, dict) and isinstance(models.get("data"), list)):
                    health = get("/api/health")
                    memory = isinstance(health, dict) and health.get("status") == "healthy"
                    result = "the memory server (its /api/health), skipped" if memory \
                        else "answers, but not as a model server"
                    tried.append({"url": root, "result": result})
                    continue
            tried.append({"url": root, "result": "a model server: used"})
            return config._replace(base_url=root + (suffix if models is not None else "")), tried
    return config, tried


def _pick_model(config: Config, info: ServerInfo | None) -> str:
    """Return --model, else the server's loaded model. Raises LLMError if there is none,
    LLMServerUnusable for info.problem."""

    if info is not None and info.problem:
        what, hint = info.problem
        raise LLMServerUnusable(f"{what} ({config.base_url})", hint)
    if info is not None and info.kind == "Ollama":
        return info.loaded          # --model as Ollama names it (a bare name is NAME:latest)
    if config.model:
        return config.model
    if info is None or not info.loaded:
        raise LLMError(f"the server at {config.base_url} has no model loaded",
                       "load one (LM Studio: lms load MODEL) or pass --model")
    return info.loaded


###############################################################################
# 22. Ollama's native API
#
# POST /api/chat, streamed as NDJSON (docs/api.md): the run's num_ctx, its options
# and format, and thinking as think: false.
###############################################################################


class OllamaNative:
    """Ollama's native chat for LLMClient (a mixin; self.native and self.num_ctx are set
    by the probe and the run)."""

    @property
    def cuts_prompts(self) -> bool:
        """Whether this server may cut a prompt that does not fit and answer all the same:
        not Ollama's native API, whose num_ctx bridge sets to fit (its prompt_eval_count
        leaves out a cached prefix, so it is no measure of a cut)."""
        return not self.native

    def _chat_native(self, messages: list[dict], request: ChatRequest) -> Completion:
        """Send one chat through Ollama's native POST /api/chat (docs/api.md): the run's
        options.num_ctx, num_predict (max_tokens), the sampling it takes, the schema as
        `format`, thinking "off" as think: false."""
        options: dict[str, Any] = {"num_ctx": self.num_ctx} if self.num_ctx else {}
        sampling, model = request.sampling or {}, request.model
        if sampling.get("temperature") is not None:
            options["temperature"] = sampling["temperature"]
        if request.max_tokens is not None:
            options["num_predict"] = request.max_tokens
        options.update({k: v for k, v in self.accepted_sampling(sampling).items()
                        if k not in ("temperature", "max_tokens")})
        payload: dict[str, Any] = {"model": model, "messages": messages, "stream": True,
                                   "options": options}
        if request.json_schema is not None and self.structured_level < len(RESPONSE_FORMS) \
                and model not in self.unconstrained:      # drop_constraint: not for this model
            payload["format"] = request.json_schema
        if request.thinking == "off":
            payload["think"] = False
        reply = self._send_with_retries(payload, request)
        return reply._replace(response_format="format" if "format" in payload else None)

    def _parse_ndjson(self, response: Any, url: str, tally: OutputTally) -> Completion:
        """Read Ollama's NDJSON chat stream: {"message": {"content", "thinking"}, "done":
        false} lines, then done: true with done_reason, prompt_eval_count and eval_count
        (docs/api.md); {"error": …} mid-stream is the server's error."""
        model = finish = usage = None
        for line in _iter_lines(response.iter_bytes(), tally.limit + RESPONSE_ENVELOPE_BYTES):
            chunk = streamed_json(line, "line", url)
            if not isinstance(chunk, dict):
                raise LLMProtocolError(f"{url} streamed a line that is not an object")
            if "error" in chunk:
                raise self._stream_error(url, line)
            model = reply_label(chunk.get("model")) or model
            message = chunk.get("message") if isinstance(chunk.get("message"), dict) else {}
            piece = reply_text(message.get("content"), "a line's message content", url)
            thinking = reply_text(message.get("thinking"), "a line's message thinking", url)
            tally.take(piece, thinking)
            if chunk.get("done") is True:
                finish = reply_label(chunk.get("done_reason")) or "stop"
                usage = _usage({"prompt_tokens": chunk.get("prompt_eval_count"),
                                "completion_tokens": chunk.get("eval_count")})
                break
        if finish is None:
            raise LLMProtocolError(f"the stream from {url} ended early, after "
                                   f"{tally.chars} characters and no done line")
        return tally.completion(usage, model, finish)


###############################################################################
# 23. LLM client: OpenAI-compatible servers
#
# LM Studio, Ollama, llama.cpp's server, vLLM: chat completions, constrained JSON,
# sampling and thinking fields a server refuses.
###############################################################################


@register_executor
class LLMClient(ServerProbes, OllamaNative, HTTPExecutor):
    """The executor of one OpenAI-compatible server (LM Studio, Ollama, llama.cpp's
    server, vLLM) at config.base_url (…/v1): SSE chunks with stream_options.include_usage,
    constrained JSON (RESPONSE_FORMS), ServerProbes and OllamaNative. The run's model
    server, opened by the CLI before the run (Runner.client)."""

    NAME = PREFIX = "openai"
    PROBED = WATCHED = True

    @classmethod
    def claims(cls, prefix: str, name: str) -> bool:
        return prefix == cls.PREFIX and not is_cloud_model(name)

    def __init__(self, config: Config, *, sleep: Callable[[float], None] = time.sleep,
                 on_retry: Callable[[str], None] | None = None):
        # the model server's key (--api-key, BRIDGE_API_KEY) goes to this client's server
        # only, as LM Studio, llama-server and vLLM take it (Authorization: Bearer)
        self.key = key = config.api_key
        super().__init__(config, config.base_url, sleep=sleep, on_retry=on_retry,
                         headers={"Authorization": f"Bearer {key}"} if key else None)
        # index into RESPONSE_FORMS of the first form this server has not refused
        self.structured_level = 0 if config.structured else len(RESPONSE_FORMS)
        self.server_kind: str | None = None     # ServerInfo.kind, once probed (SAMPLING_FIELDS)
        self.native = False                     # Ollama's native /api/chat (probe; --ollama-api)
        self.num_ctx: int | None = None         # the options.num_ctx every native request sends
        self.tokenizer_refused = False          # the server's tokenizer route failed (count_tokens)
        self.extras_refused = False             # the server refused a field of SAMPLING_FIELDS
        self.thinking_refused: set[str] = set()     # THINKING_OFF_FIELDS it refused
        # model -> why its constraint garbled: its JSON steps go unconstrained (drop_constraint)
        self.unconstrained: dict[str, str] = {}

    def _raise_fault(self, url: str, status: int, message: str) -> None:
        fault = server_fault(status, message, bool(self.config.api_key))
        if fault is not None:
            what, hint = fault
            raise LLMServerUnusable(f"{what}: {url} answered HTTP {status}: {message}", hint,
                                    status)

    def _gave_up(self, exc: LLMError, started: float, retries: int) -> LLMError:
        """A server still unreachable after the retries is gone for the run
        (LLMServerUnusable, saying how long bridge waited)."""
        if not isinstance(exc, LLMUnavailable):     # a timeout may be the step's own (long prompt)
            return exc
        waited = time.monotonic() - started
        return LLMServerUnusable(f"the model server stopped answering: {exc}; waited "
                                 f"{waited:.0f} s over {retries} retries "
                                 "(--retries, --retry-delay)",
                                 "start it again, then run bridge again")

    def accepted_sampling(self, sampling: dict) -> dict:
        """Return the fields of sampling this server takes: OpenAI's (temperature, seed,
        max_tokens), and SAMPLING_FIELDS of its kind unless it refused one (OpenAI-strict
        servers refuse unknown fields)."""
        extras = () if self.extras_refused else SAMPLING_FIELDS.get(self.server_kind or "", ())
        return {k: v for k, v in sampling.items()
                if k in ("temperature", "seed", "max_tokens") or k in extras}

    def thinking_fields(self) -> dict:
        """THINKING_OFF_FIELDS of its kind (or THINKING_OFF_DEFAULT) less those refused."""
        fields = THINKING_OFF_FIELDS.get(self.server_kind or "", THINKING_OFF_DEFAULT)
        return {k: v for k, v in fields.items() if k not in self.thinking_refused}

    def drop_constraint(self, model: str, why: str) -> None:
        """Send model's JSON requests unconstrained from now on: its constrained output
        garbled (why says how). The answer is still checked."""
        self.unconstrained.setdefault(model, why)

    def chat(self, messages: list[dict], request: ChatRequest) -> Completion:
        """Send one chat completion, streamed. json_schema goes as the first of
        RESPONSE_FORMS the server has not refused (none after drop_constraint), sampling
        as accepted_sampling, thinking "off" as thinking_fields; what the server refuses
        is dropped for this client's life and the request resent at once, not counted as
        a retry (_drop_refused). Raises LLMError, never an httpx exception."""
        if self.native:
            return self._chat_native(messages, request)
        model, json_schema, thinking = request.model, request.json_schema, request.thinking
        payload: dict[str, Any] = {"model": model, "messages": messages, "stream": True,
                                   "stream_options": {"include_usage": True}}
        if request.max_tokens is not None:
            payload["max_tokens"] = request.max_tokens
        payload.update(self.accepted_sampling(request.sampling or {}))
        if self.structured_level < len(RESPONSE_FORMS):     # constrained JSON is on
            first = FIRST_RESPONSE_FORM.get(self.server_kind or "", 0)
            self.structured_level = max(self.structured_level, first)
        while True:
            if thinking == "off":
                payload.update(self.thinking_fields())
            form = RESPONSE_FORMS[self.structured_level] if json_schema is not None and \
                self.structured_level < len(RESPONSE_FORMS) and \
                model not in self.unconstrained else None
            if form is None:
                payload.pop("response_format", None)
            else:
                payload["response_format"] = form(json_schema)
            try:
                reply = self._send_with_retries(payload, request)
                return reply._replace(response_format=form and payload["response_format"]["type"])
            except LLMProtocolError as exc:
                if getattr(exc, "silent_end", False) and self.server_kind == "llama-cpp-python":
                    self._overflow_check(payload, request.timeout_s)
                raise
            except LLMHTTPError as exc:
                if not self._drop_refused(exc, payload, form is not None, thinking):
                    raise

    def _drop_refused(self, exc: LLMHTTPError, payload: dict, constrained: bool,
                      thinking: str | None) -> bool:
        """After an HTTP error: drop from payload, for this client's life, what the server
        refused (a thinking field; the extra sampling fields; this response_format, for
        the next of RESPONSE_FORMS) and tell whether the request goes again at once."""
        if thinking == "off" and self._thinking_refused(exc, payload):
            return True
        refused = [k for k in SAMPLING_FIELDS.get(self.server_kind or "", ())
                   if k in payload and k in str(exc)]
        if refused and exc.status in (400, 422):
            self._on_retry(f"the server refused {', '.join(refused)} "
                           f"({clip(str(exc), 160, 'message')}); sending no extra sampling fields")
            self.extras_refused = True
            for key in SAMPLING_FIELDS[self.server_kind]:   # type: ignore[index]
                payload.pop(key, None)
            return True
        if not constrained or not _refuses_response_format(exc):
            return False
        self._on_retry("the server refused response_format "
                       f"{payload['response_format']['type']} "
                       f"({clip(str(exc), 160, 'message')}); trying the next form")
        self.structured_level += 1
        return True

    def _overflow_check(self, payload: dict, timeout_s: float | None) -> None:
        """llama-cpp-python ends a stream whose prompt is over its n_ctx with no word
        (the ValueError is raised inside the stream: llama_cpp/server/app.py); the same
        request unstreamed, with max_tokens 1, gets its 400 context_length_exceeded
        naming the tokens and the context (llama_cpp/server/errors.py). Raises that
        LLMHTTPError; returns when the request is not over the context."""
        once = {k: v for k, v in payload.items() if k != "stream_options"}
        once.update(stream=False, max_tokens=1)
        for _ in range(2):      # the cut stream's connection may be closed: again on a new one
            try:
                self._stream_once(once, timeout_s, OutputTally(self.config.max_output_bytes))
            except LLMUnavailable:
                continue
            except LLMHTTPError as exc:
                if exc.context_overflow:
                    raise
            except LLMError:
                pass
            return

    def _thinking_refused(self, exc: LLMHTTPError, payload: dict) -> bool:
        """Drop from payload, for good, the thinking fields a 400/422 refused; tell
        whether any was: those it names, else (naming no response_format or sampling
        field either) all that were sent: a server refusing without saying why must not
        lose every attempt to a field bridge added."""
        sent = [k for k in THINKING_OFF_DEFAULT if k in payload]
        if exc.status not in (400, 422) or exc.context_overflow or not sent:
            return False
        refused = [k for k in sent if k in str(exc)]
        if not refused and (_refuses_response_format(exc) or any(
                k in str(exc) for k in SAMPLING_FIELDS.get(self.server_kind or "", ()))):
            return False
        refused = refused or sent
        self._on_retry(f"the server refused {', '.join(refused)} "
                       f"({clip(str(exc), 160, 'message')}); not sending it again")
        self.thinking_refused.update(refused)
        for key in refused:
            payload.pop(key)
        return True

    def _parse(self, response: Any, url: str, tally: OutputTally) -> Completion:
        """Read a 200 reply: Ollama's NDJSON, an SSE stream, or a whole chat.completion."""
        if self.native:
            return self._parse_ndjson(response, url, tally)
        if "text/event-stream" not in response.headers.get("content-type", ""):
            body = response.read(self.config.max_output_bytes + RESPONSE_ENVELOPE_BYTES)
            return self._parse_whole(body, url, tally)
        return self._parse_stream(response, url, tally)

    def _parse_whole(self, body: bytes, url: str, tally: OutputTally) -> Completion:
        """Read a non-streamed chat.completion body (servers that ignore stream), its text
        held to --max-output-bytes as a stream's is."""
        try:
            data = load_reply(body)
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            if not isinstance(text, str):
                raise TypeError("content is not a string")
            reasoning = reasoning_delta(choice["message"])
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            shown = clip(body.decode("utf-8", "replace"), 120, "body")
            raise LLMProtocolError(f"{url} answered 200 with a body that is not a chat "
                                   f"completion: {shown}") from exc
        if reasoning:
            tally.add_reasoning(reasoning)
        tally.add_answer(text)
        return Completion(text, _usage(data.get("usage")), reply_label(data.get("model")),
                          reply_label(choice.get("finish_reason")),
                          time.monotonic() - tally.started, 0.0, reasoning,
                          int(len(reasoning) / CHARS_PER_TOKEN) if reasoning else 0)

    def _parse_stream(self, response: Any, url: str, tally: OutputTally) -> Completion:
        """Read an SSE chat.completion.chunk stream to its end and return the Completion
        (reasoning_delta goes to on_reasoning, never the text)."""
        usage = model = finish = None
        done = False
        events = _iter_sse(response.iter_bytes(), tally.limit + RESPONSE_ENVELOPE_BYTES)
        for event, data in events:
            if data.strip() == "[DONE]":
                done = True
                # read on to the stream's end (servers end it here), so the connection is
                # kept for the next request; stop at the first event, should one come
                next(events, None)
                break
            chunk = streamed_json(data, "event", url)
            if event == "error" or (isinstance(chunk, dict) and "error" in chunk):
                raise self._stream_error(url, data)
            if not isinstance(chunk, dict):
                raise LLMProtocolError(f"{url} streamed a chunk that is not an object")
            usage = _usage(chunk.get("usage")) or usage
            model = reply_label(chunk.get("model")) or model
            choice = chunk_choice(chunk, url)
            if choice is not None:
                delta, finish = choice[0], choice[1] or finish
                piece = reply_text(delta.get("content"), "a chunk's delta content", url)
                tally.take(piece, reasoning_delta(delta))
        if not done and finish is None:
            error = LLMProtocolError(f"the stream from {url} ended early, after "
                                     f"{tally.chars} characters and no finish_reason")
            error.silent_end = not tally.received   # llama-cpp-python's overflow looks so (chat)
            raise error
        if finish is None and self.server_kind == "llama-cpp-python":
            raise LLMContention(f"llama-cpp-python ended the stream from {url} after "
                                f"{tally.chars} characters to serve another request",
                                "start it with --interrupt_requests False so requests queue")
        if not tally.received and not tally.thought and finish is None:
            raise LLMProtocolError(f"{url} streamed no output at all",
                                   "the prompt may not fit the loaded context length")
        return tally.completion(usage, model, finish)


@register_executor
class OllamaCloud(LLMClient):
    """An Ollama cloud model (a *-cloud name: Ollama docs/cloud.mdx) asked through the
    run's model server but run on ollama.com, where the project's files would go: only
    with --allow-executor ollama-cloud, and stopped at the spend cap. Facts only: its
    requests go through the run's LLMClient."""

    NAME, PREFIX = "ollama-cloud", ""
    PAID = CLOUD = True

    @classmethod
    def claims(cls, prefix: str, name: str) -> bool:
        return prefix == LLMClient.PREFIX and is_cloud_model(name)

    @classmethod
    def refusal(cls, ref: str, name: str) -> tuple[str, str]:
        return (f"model {name} runs on ollama.com, where the project's files would go",
                f"let it run with --allow-executor {cls.NAME}")


###############################################################################
# 24. Other executors: the Anthropic API and the claude CLI
# The same chat() as LLMClient, so nothing above the runner knows which one runs.
###############################################################################


def claude_price(model: str) -> tuple[float, float] | None:
    """(input, output) US dollars per million tokens of a Claude model id, dated or not
    (claude-haiku-4-5-20251001 is claude-haiku-4-5), or None."""
    known = [name for name in CLAUDE_PRICES_USD_PER_MTOK if model.startswith(name)]
    return CLAUDE_PRICES_USD_PER_MTOK[max(known, key=len)] if known else None


def anthropic_usage_cost(input_tokens: Any, output_tokens: Any, model: str | None) -> tuple:
    """Return (usage, cost_usd) from the counts a Messages stream reported: checked_usage,
    and that at claude_price(model), or None when either is unknown: the runner then
    prices it (priced_reply), so neither slips past --max-cost-usd."""
    usage, price = checked_usage(input_tokens, output_tokens), claude_price(model or "")
    return usage, round(usage_cost_usd(usage, price), 6) if usage and price else None


@register_executor
class AnthropicClient(HTTPExecutor):
    """The executor of the Anthropic Messages API, or a server speaking it (LM Studio,
    Ollama, a gateway): POST {base}/v1/messages with x-api-key and anthropic-version
    2023-06-01, the system prompt as the top-level "system", streamed: message_start
    (input usage), content_block_delta (text_delta), message_delta (stop_reason,
    cumulative output usage), message_stop; an "error" event fails the request, others
    are ignored (platform.claude.com/docs/en/api/messages-streaming). Raises LLMError
    when no API key is set."""

    NAME = PREFIX = "anthropic"
    PAID = CLOUD = True
    CHAT_PATH = "/v1/messages"
    DEFAULT_MAX_TOKENS = 4096        # the API requires max_tokens

    def __init__(self, config: Config, *, sleep: Callable[[float], None] = time.sleep,
                 on_retry: Callable[[str], None] | None = None):
        if not config.anthropic_api_key:
            raise LLMError("no Anthropic API key for an anthropic: model",
                           "set ANTHROPIC_API_KEY (a gateway or LM Studio take any value)")
        self.key = key = config.anthropic_api_key
        super().__init__(config, config.anthropic_base_url, sleep=sleep, on_retry=on_retry,
                         headers={"x-api-key": key, "anthropic-version": "2023-06-01"})

    def chat(self, messages: list[dict], request: ChatRequest) -> Completion:
        """Send one Messages request, streamed; of request.sampling only temperature is
        sent, json_schema and thinking are not (the output is checked all the same)."""
        payload: dict[str, Any] = {
            "model": request.model, "max_tokens": request.max_tokens or self.DEFAULT_MAX_TOKENS,
            "stream": True, "messages": [{"role": m["role"], "content": m["content"]}
                                         for m in messages if m["role"] != "system"]}
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        if system:
            payload["system"] = system
        temperature = (request.sampling or {}).get("temperature")
        if temperature is not None:
            payload["temperature"] = temperature
        return self._send_with_retries(payload, request)

    def _parse(self, response: Any, url: str, tally: OutputTally) -> Completion:
        """Read a Messages event stream (see the class) into tally."""
        prompt = completion = model = stop = None
        done = False
        for event, data in _iter_sse(response.iter_bytes(), tally.limit + RESPONSE_ENVELOPE_BYTES):
            body = streamed_json(data, "event", url)
            kind = body.get("type", event) if isinstance(body, dict) else event
            if kind == "error" or event == "error":
                raise self._stream_error(url, data)
            if not isinstance(body, dict):
                raise LLMProtocolError(f"{url} streamed an event that is not an object: "
                                       f"{clip(data, 120, 'event')}")
            if kind == "message_start":
                message = reply_object(body.get("message"), "message_start's message", url)
                model = reply_label(message.get("model"))
                usage = reply_object(message.get("usage"), "message_start's usage", url)
                prompt = usage.get("input_tokens")
            elif kind == "content_block_delta":
                delta = reply_object(body.get("delta"), "a content_block_delta's delta", url)
                piece = reply_text(delta.get("text"), "a text_delta's text", url) \
                    if delta.get("type") == "text_delta" else None
                tally.take(piece or "")
            elif kind == "message_delta":
                stop = reply_label(reply_object(body.get("delta"), "message_delta's delta", url)
                                   .get("stop_reason")) or stop
                usage = reply_object(body.get("usage"), "message_delta's usage", url)
                completion = usage.get("output_tokens")
            elif kind == "message_stop":
                done = True
                break
        if not done:
            raise LLMProtocolError(f"the stream from {url} ended before message_stop, after "
                                   f"{tally.chars} characters")
        usage, cost = anthropic_usage_cost(prompt, completion, model)
        return tally.completion(usage, model, stop, cost)


@register_executor
class ClaudeCLI(Executor):
    """The executor that hands a step to Claude Code: `claude -p` with LOCKDOWN (an argv,
    never a shell), the prompt on stdin, run in the plan's project only when it is trusted
    (else _workdir), with the environment claude_env leaves; its process group is killed
    when the step's time (timeout_s under --timeout) runs out. Reads the NDJSON events
    (code.claude.com/docs/en/headless): system/init, assistant messages (their text
    streams), the closing result (result, is_error, usage, total_cost_usd); other lines
    are skipped. A non-zero exit or is_error fails the attempt with the result text or
    the last lines of stderr."""

    # No tools (built-in: --tools ""; MCP: --strict-mcp-config without --mcp-config),
    # only the user's own settings (never the project's .claude/settings*.json and its
    # hooks), and the default permission mode whatever a settings file asks for.
    # Source: https://code.claude.com/docs/en/cli-reference (--tools, --strict-mcp-config,
    # --setting-sources, --permission-mode), read 2026-12-04.
    LOCKDOWN = ("--tools", "", "--strict-mcp-config", "--setting-sources", "user",
                "--permission-mode", "default")
    NAME = PREFIX = "claude-cli"
    PAID = AGENTIC = CLOUD = True

    def __init__(self, config: Config, cwd: Path | None = None):
        import shutil

        self.config, self.cwd = config, cwd
        path = dict(config.tool_env).get("PATH")
        self.binary = shutil.which("claude", path=path)
        if self.binary is None:
            raise LLMUnavailable("the claude CLI was not found on PATH, for a claude-cli: model",
                                 "install Claude Code (npm install -g @anthropic-ai/claude-code)")

    @classmethod
    def for_run(cls, config: Config, cwd: Path | None,
                on_retry: Callable[[str], None]) -> "ClaudeCLI":
        return cls(config, cwd)

    def chat(self, messages: list[dict], request: ChatRequest) -> Completion:
        """Run one `claude -p` request: request's model, timeout_s and on_delta (the rest
        has no claude flag). Raises LLMTimeout when the time runs out, LLMError when
        claude fails."""
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        turns = [m for m in messages if m["role"] != "system"]
        prompt = turns[0]["content"] if len(turns) == 1 else "\n\n".join(
            f"[{m['role']}]\n{m['content']}" for m in turns)
        argv = [self.binary, "-p", "--output-format", "stream-json", "--verbose",
                "--model", request.model, "--no-session-persistence", *self.LOCKDOWN]
        argv += ["--append-system-prompt", system] if system else []
        with self._workdir() as cwd:
            limit_s = narrowed(request.timeout_s, self.config.timeout_s)
            tally = OutputTally(self.config.max_output_bytes, request)
            return self._run(argv, prompt, cwd, limit_s, tally)

    def _workdir(self) -> Any:
        """The folder claude runs in: the trusted project, else a scratch folder (0700,
        under the state dir) removed afterwards."""
        import tempfile

        if self.cwd is not None:
            return _Nothing(self.cwd)
        root = os.path.join(self.config.state_dir, "scratch")
        private_dir(root)
        return tempfile.TemporaryDirectory(prefix="claude-", dir=root)

    def _run(self, argv: list[str], prompt: str, cwd: Any, limit_s: float,
             tally: OutputTally) -> Completion:
        import subprocess

        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=cwd,
                                env=claude_env(self.config.tool_env), start_new_session=True)
        stderr: list[bytes] = []
        reader = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)
        reader.start()
        fired = threading.Event()
        timer = threading.Timer(limit_s, lambda: (fired.set(), _kill_group(proc)))
        timer.start()
        try:
            with _suppress(BrokenPipeError):
                proc.stdin.write(prompt.encode("utf-8"))
                proc.stdin.close()
            final, answered_by = self._read_events(proc, tally)
            code = proc.wait()
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            timer.cancel()
            reader.join(timeout=1)
        elapsed = time.monotonic() - started
        if fired.is_set():
            raise LLMTimeout(f"claude did not finish within {limit_s:g} s; stopped it",
                             "raise the step's timeout_s or --timeout")
        tail = " | ".join(b"".join(stderr).decode("utf-8", "replace").strip().splitlines()[-3:])
        if final is None:
            raise LLMError(f"claude exited {code} without a result" + (f": {tail}" if tail else ""))
        errors = final.get("errors") if isinstance(final.get("errors"), list) else []
        if code != 0 or final.get("is_error"):
            reason = final.get("result") or "; ".join(map(str, errors)) or tail
            raise LLMError(f"claude failed ({reply_label(final.get('subtype'))}, exit {code}): "
                           f"{clip(str(reason), 300, 'text')}")
        usage, cost = claude_usage_cost(final)
        result = final.get("result")
        reply = tally.completion(usage, reply_label(answered_by), reply_label(final.get("subtype")),
                                 cost)
        return reply._replace(text=result if isinstance(result, str) and result else reply.text,
                              duration_s=elapsed)

    def _read_events(self, proc: Any, tally: OutputTally) -> tuple[dict | None, str | None]:
        """Read claude's NDJSON to its end, assistant text into tally: (result event, model)."""
        final = model = None
        # a line longer than a reply may be is read in parts (none of them JSON), never whole
        line_max = self.config.max_output_bytes + RESPONSE_ENVELOPE_BYTES
        for raw in iter(lambda: proc.stdout.readline(line_max), b""):
            try:
                event = load_reply(raw)
            except ValueError:
                continue                        # not an event (a warning, garbage): skip it
            if not isinstance(event, dict):
                continue
            if event.get("type") == "system" and event.get("subtype") == "init":
                model = event.get("model") or model
            elif event.get("type") == "assistant":
                message = event.get("message") if isinstance(event.get("message"), dict) else {}
                blocks = message.get("content") if isinstance(message.get("content"), list) else []
                for block in blocks:
                    if isinstance(block, dict) and block.get("type") == "text" \
                            and isinstance(block.get("text"), str):
                        try:
                            tally.take(block["text"])
                        except LLMProtocolError:
                            _kill_group(proc)
                            raise
            elif event.get("type") == "result":
                final = event
        return final, model


def claude_usage_cost(final: dict) -> tuple:
    """Return (usage, cost_usd) from the claude CLI's result event: checked_usage of its
    input_tokens and output_tokens, and its total_cost_usd when reported_cost_usd believes
    it (at most USAGE_MAX_TOKENS at the dearest price), else None (priced_reply)."""
    usage = final.get("usage") if isinstance(final.get("usage"), dict) else {}
    most = USAGE_MAX_TOKENS * max(max(p) for p in CLAUDE_PRICES_USD_PER_MTOK.values()) / 1e6
    return (checked_usage(usage.get("input_tokens"), usage.get("output_tokens")),
            reported_cost_usd(final.get("total_cost_usd"), most))


def claude_env(environ: Any) -> dict[str, str]:
    """The part of an environment (pairs or a dict) a claude-cli: process gets:
    TOOL_ENV_NAMES and the names starting with TOOL_ENV_PREFIXES."""

    pairs = environ.items() if isinstance(environ, dict) else environ
    return {k: v for k, v in pairs if k in TOOL_ENV_NAMES or k.startswith(TOOL_ENV_PREFIXES)}


class _Nothing:
    """A context manager giving value and doing nothing (contextlib.nullcontext)."""

    def __init__(self, value: Any):
        self.value = value

    def __enter__(self) -> Any:
        return self.value

    def __exit__(self, *exc: object) -> None:
        return None


def _kill_group(proc: Any) -> None:
    """SIGKILL a process and its children (it leads its own session)."""
    with _suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


###############################################################################
# 25. Check commands
###############################################################################


def untrusted_message(plan: Plan) -> str:
    """Return why a plan's commands do not run, and the command that would let them."""
    return (f"commands run only in trusted projects, and {plan.project} is not one; trust it "
            f"with `bridge --trust {plan.project}` (or BRIDGE_TRUSTED_PROJECTS), or approve "
            f"this plan with `bridge --approve {plan.id}`")


def command_env(config: Config) -> dict[str, str]:
    """Return the environment a plan's commands run in: the user's as bridge started less
    every name credential_env_name flags, but those named with --pass-env, so a check
    never sees a secret it was not given. PYTHONDONTWRITEBYTECODE=1 is added: Python
    trusts a cached .pyc while the source keeps its size and its mtime's second, and a
    retry rewrites a file within the same second, often at the same size (`x + 2` →
    `x * 2`), so the retry's test would run the failed attempt's code."""
    passed = set(config.pass_env)
    env = {k: v for k, v in config.tool_env if k in passed or not credential_env_name(k)}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


class CommandRun(namedtuple("CommandRun",
                            "argv exit_code duration_s output_tail output_bytes timed_out error")):
    """What one command did: argv (list of str), exit_code (int; negative: killed by that
    signal; None: it never started), duration_s (seconds), output_tail (the last
    COMMAND_TAIL_BYTES bytes of its output, as text, marked when cut, secrets redacted; ""
    when it passed), output_bytes (all it wrote), timed_out, error (one line, or None)."""

    __slots__ = ()

    def as_dict(self) -> dict:
        """Return the record kept in the result and the run log."""
        return {**self._asdict(), "argv": list(self.argv),
                "duration_s": round(self.duration_s, 3)}


# The program a check command runs under on Linux (reaped_argv): `python -I -S -c
# REAPER_SOURCE FD ARGV...`. It makes itself a child subreaper (prctl
# PR_SET_CHILD_SUBREAPER = 36, Linux 3.4+; man 2 prctl), so every process the command
# leaves behind, setsid and double-forked daemons included, is re-parented to it instead
# of to init; it runs the command in a process group of its own; once the command exits,
# or at SIGTERM (bridge's time-out or cancel), it SIGKILLs that group, then every process
# re-parented to it, again until none is left, and exits as the command did (a signal's
# death re-raised, with no core file). When exec fails, the errno goes back on FD.
REAPER_SOURCE = r"""
import ctypes, os, resource, signal, sys
report, argv, pid, stopping = int(sys.argv[1]), sys.argv[2:], 0, False
os.set_inheritable(report, False)
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
def stop(signum, frame):
    global stopping
    stopping = True
    if pid:
        try: os.killpg(pid, signal.SIGKILL)
        except OSError: pass
signal.signal(signal.SIGTERM, stop)
pid = os.fork()
if pid == 0:
    try:
        os.setpgid(0, 0)
        for name in ("SIGTERM", "SIGPIPE", "SIGXFSZ"):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        os.execvp(argv[0], argv)
    except OSError as exc:
        os.write(report, str(exc.errno).encode())
    os._exit(127)
os.close(report)
try: os.setpgid(pid, pid)
except OSError: pass
if stopping: stop(0, None)
status = os.waitpid(pid, 0)[1]
signal.signal(signal.SIGTERM, signal.SIG_IGN)
def children():
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as handle:
                fields = handle.read().rpartition(")")[2].split()
        except OSError: continue
        if name.isdigit() and int(fields[1]) == os.getpid(): found.append(int(name))
    return found
try: os.killpg(pid, signal.SIGKILL)
except OSError: pass
kept = set()       # a setuid child (sudo -b) refuses the signal: left, never waited for
while kids := [kid for kid in children() if kid not in kept]:
    for kid in kids:
        try: os.kill(kid, signal.SIGKILL)
        except PermissionError: kept.add(kid)
        except OSError: pass
    for kid in kids:
        try:
            if kid not in kept: os.waitpid(kid, 0)
        except OSError: pass
if os.WIFSIGNALED(status):
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if os.WTERMSIG(status) != signal.SIGKILL: signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
os._exit(os.waitstatus_to_exitcode(status) & 255)
"""
REAPER_GRACE_S = 5.0       # after its SIGTERM the reaper has this long to sweep, then it is killed


def reaped_argv(argv: list[str], report_fd: int) -> list[str] | None:
    """Return argv run under REAPER_SOURCE, reporting exec errors on report_fd; None where
    there is no child subreaper (not Linux, or no sys.executable): there only the
    command's process group is killed, and a child that leaves it (setsid) can live on."""
    if not sys.platform.startswith("linux") or not sys.executable:
        return None
    return [sys.executable, "-I", "-S", "-c", REAPER_SOURCE, str(report_fd), *argv]


def run_command(argv: list[str], cwd: Path, env: dict[str, str], timeout_s: float,
                cancel: Any = None) -> CommandRun:
    """Run argv (no shell) in cwd with env and stdin from /dev/null; return a CommandRun.
    stdout and stderr go to one pipe, of which the last COMMAND_TAIL_BYTES bytes are kept.
    The command leads its own process group; once it exits, or after timeout_s seconds, or
    when cancel (a threading.Event) is set, the whole group is killed, and on Linux every
    other process it started too (REAPER_SOURCE). Never raises for a command that cannot
    start (that is a failed check saying why)."""
    import selectors, subprocess

    started = time.monotonic()
    report, report_w = os.pipe()
    reaped = reaped_argv(argv, report_w)
    try:
        proc = subprocess.Popen(reaped or argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, pass_fds=(report_w,) if reaped else ())
    except OSError as exc:
        os.close(report)
        return _not_started(argv, started, exc.strerror or exc)
    finally:
        os.close(report_w)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            read = _read_tail(proc, selector, started + timeout_s, cancel)
    finally:
        if reaped:
            _stop_reaper(proc)
        _kill_group(proc)               # the command's children too, even those that outlive it
        proc.stdout.close()
        code = proc.wait()
        with open(report, "rb") as handle:
            failed = handle.read(32)
    if failed.isdigit():
        return _not_started(argv, started, os.strerror(int(failed)))
    return _command_outcome(argv, code, time.monotonic() - started, read, timeout_s)


def _not_started(argv: list[str], started: float, why: Any) -> CommandRun:
    return CommandRun(list(argv), None, time.monotonic() - started, "", 0, False,
                      f"`{shell_words(argv)}` could not start: {why}")


def _stop_reaper(proc: Any) -> None:
    """Have a command's reaper end it and sweep its descendants (SIGTERM) if it has not
    exited; wait up to REAPER_GRACE_S without reaping it (its pid names the process group
    _kill_group kills after)."""
    if _exited(proc):
        return
    with _suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + REAPER_GRACE_S
    while not _exited(proc) and time.monotonic() < deadline:
        time.sleep(0.005)


def _read_tail(proc: Any, selector: Any, deadline: float,
               cancel: Any) -> tuple[bytes, int, str | None]:
    """Read a command's output (selector: proc.stdout registered) until it exits (its
    children may still hold the pipe: what they wrote so far is read), the deadline passes
    or cancel is set. Returns (the last COMMAND_TAIL_BYTES bytes, bytes read, "timeout" |
    "cancel" | None)."""
    tail, total, exited_at = bytearray(), 0, None
    while True:
        now = time.monotonic()
        if now >= deadline:
            return bytes(tail), total, "timeout"
        if cancel is not None and cancel.is_set():
            return bytes(tail), total, "cancel"
        if exited_at is None and _exited(proc):
            exited_at = now
        if exited_at is not None and now - exited_at > 0.2:
            return bytes(tail), total, None      # it exited; a child may keep the pipe open
        if not selector.select(min(0.1, deadline - now)):
            continue
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            return bytes(tail), total, None
        total += len(chunk)
        tail += chunk
        del tail[:-COMMAND_TAIL_BYTES]


def _exited(proc: Any) -> bool:
    """Tell whether a child has exited, without reaping it where the OS allows (its pid,
    and so its process group's id, cannot be reused before proc.wait())."""
    if not hasattr(os, "waitid"):
        return proc.poll() is not None
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _command_outcome(argv: list[str], code: int, duration_s: float,
                     read: tuple[bytes, int, str | None], timeout_s: float) -> CommandRun:
    """read: what _read_tail returned."""
    tail, total, stopped = read
    text = redact(tail.decode("utf-8", "replace"))
    if total > len(tail):
        text = (f"[bridge: the first {total - len(tail)} of {total} bytes of output are left "
                "out]\n" + text)
    shown = f"`{shell_words(argv)}`"
    if stopped == "timeout":
        error = f"{shown} did not finish within {timeout_s:g} s; killed it and its process group"
    elif stopped == "cancel":
        error = f"{shown} was stopped: the run is ending"
    elif code != 0:
        error = f"{shown} failed (exit {code})"
    else:
        error = None
        text = ""       # a passing check keeps no output: `env`, a test printing its config
    return CommandRun(list(argv), code, duration_s, text, total, stopped == "timeout", error)


###############################################################################
# 26. File transactions: journal, rollback, recovery
###############################################################################


def remove_tree(path: Path) -> None:
    """Delete a folder of bridge's own and all in it, not following symlinks (shutil.rmtree);
    what cannot be removed is left."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class FileTransaction:
    """The files one plan run writes inside its project, with their originals. project is
    opened once; every write, folder, rename, removal and restore works relative to it,
    one component at a time without following symlinks, so a folder swapped for a symlink
    mid-run fails that write (PathError), never lands outside. run_dir: this run's folder,
    for backups (0o600 in 0o700 folders) and journal.jsonl. guard: what may never be
    written (forbidden_target_reason). refused: the journal entries recover() would not use.
    """

    def __init__(self, project: Path, run_dir: Path, crash_at: str | None = None,
                 guard: Guard | None = None):
        self.project, self.run_dir, self.crash_at = project, run_dir, crash_at
        self.guard = guard or Guard()
        self.changes: dict[str, FileChange] = {}
        self.old_runs: list[Path] = []
        self.refused: list[str] = []
        self.lock = threading.Lock()     # parallel steps write; the rollback must see them all
        self.closed = False
        self._root_fd: int | None = None

    def _root(self) -> int:
        """The project folder's descriptor, opened on first use (PathError when it cannot be)."""
        if self._root_fd is None:
            self._root_fd = _open_root(self.project)
        return self._root_fd

    def _release(self) -> None:
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    def check(self, rel: str) -> list[str]:
        """Return rel's components, or raise PathError when it may not be written."""
        parts = plan_path_parts(rel)
        reason = forbidden_target_reason(self.project, rel, self.guard)
        if reason:
            raise PathError(reason)
        return parts

    def write(self, rel: str, text: str, step: int = 0) -> FileChange:
        """Write text (UTF-8) to project/rel atomically for a step, its original journalled
        first; return its FileChange. Raises PathError when rel may not be written, cannot
        be (the original untouched, its backup kept), or the run is ending."""
        parts = self.check(rel)
        with self.lock:
            if self.closed:
                raise PathError(f"not writing {rel!r}: the run is ending")
            try:
                fd, depth = _walk(self._root(), parts[:-1], rel)
                try:
                    change = self.changes.get(rel) \
                        or self._journal_original(rel, parts, fd, depth, step)
                    if change.action == "reverted":      # put back by revert_path, written again
                        change.action = "created" if change.backup is None else "modified"
                    crash_point(self.crash_at, "journal")
                    if depth < len(parts) - 1:
                        inner, _ = _walk(fd, parts[depth:-1], rel, make=True)
                        os.close(fd)
                        fd = inner
                    mode = _file_mode(fd, parts[-1], rel)
                    _replace_in(fd, parts[-1], text.encode("utf-8"), mode, self.crash_at)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise PathError(f"cannot write {rel!r} in {self.project}: "
                                f"{exc.strerror or exc}") from exc
        return change

    def close(self) -> None:
        """Refuse every later write (steps still running when a run ends must not write)."""
        with self.lock:
            self.closed = True

    def _journal_original(self, rel: str, parts: list[str], fd: int, depth: int,
                          step: int) -> FileChange:
        """Journal a path's original (and the folders about to be made) before touching it.
        fd: the deepest existing folder on its way, depth folders down."""
        mode = _file_mode(fd, parts[-1], rel) if depth == len(parts) - 1 else None
        if mode is not None:
            with open_regular(parts[-1], fd) as original:      # copied in pieces, never held whole
                digest = sha256_hex(original)
                original.seek(0)
                backup = self._save_backup(f"{len(self.changes):04d}-{parts[-1][:200]}", original)
            change = FileChange(rel, "modified", backup, mode)
        else:
            missing = [self.project / Path(*parts[:n + 1]) for n in range(depth, len(parts) - 1)]
            change, digest = FileChange(rel, "created", created_dirs=missing), None
        append_jsonl(self.run_dir / JOURNAL_FILE, {
            "step": step, "path": rel, "action": change.action, "backup": str(change.backup or ""),
            "mode": change.mode, "created_dirs": [str(p) for p in change.created_dirs],
            "backup_sha256": digest})
        self.changes[rel] = change
        return change

    def _save_backup(self, name: str, data: Any) -> Path:
        """Keep an original as run_dir/backups/name, 0o600 in a 0o700 folder, fsynced."""
        backup = private_dir(private_dir(self.run_dir) / "backups") / name
        fd = os.open(backup, _NEW_FILE, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with _suppress(OSError):
                os.unlink(backup)
            raise
        os.close(fd)
        return backup

    def recover(self, old_run_dir: Path, kept_steps: set[int]) -> list[str]:
        """Take over the files of a killed run (its folder old_run_dir): files of steps in
        kept_steps stay and their originals are adopted (a later rollback still restores
        them); the rest are put back, with the temp files an interrupted write left. The
        journal is untrusted: read only from a run folder beside this one; an entry
        journalled_paths refuses, or malformed, goes to self.refused. Returns the paths put
        back. Raises RollbackError naming what could not be restored."""
        try:
            old_run_dir = run_folder(self.run_dir.parent, old_run_dir.name)
            entries = read_jsonl(old_run_dir / JOURNAL_FILE)
        except (PathError, OSError) as exc:
            why = getattr(exc, "strerror", None) or exc
            self.refused.append(f"journal of {old_run_dir.name}: {why}")
            return []
        self.old_runs.append(old_run_dir)
        if any(entry.get("reverted") is True for entry in entries):
            return []               # that run had already put everything back
        restored, undo = [], []
        for entry in entries:
            change = self._journalled(entry, old_run_dir)
            if change is None:
                continue
            if entry.get("step") in kept_steps and change.path not in self.changes:
                if change.backup is not None and not self._adopt_backup(change, old_run_dir):
                    continue
                self.changes[change.path] = change
                append_jsonl(self.run_dir / JOURNAL_FILE, {   # a second crash still knows it
                    **entry, "backup": str(change.backup or ""),
                    "created_dirs": [str(p) for p in change.created_dirs]})
            elif entry.get("step") not in kept_steps:
                undo.append(change)
        for change in undo:
            self._remove_temps(change.path)
            restored.append(change.path)
        self._restore(undo)
        if old_run_dir != self.run_dir:     # what it kept is copied here, the rest is back
            self._drop_backups(old_run_dir)
        return restored

    def revert_path(self, rel: str) -> None:
        """Put one path back as it was before this run first wrote it (a failed attempt's
        file must not stay); its action is "reverted" until written again. Raises
        RollbackError when it cannot be restored."""
        with self.lock:
            change = self.changes.get(rel)
            if change is not None and change.action != "reverted":
                self._restore([change])

    def _adopt_backup(self, change: FileChange, run_dir: Path) -> bool:
        """Copy a kept file's original from a taken-over run into this run's backups (each
        journal names only its own run's backups); False (refused) when it cannot be read."""
        try:
            original = open_regular(change.backup)     # type: ignore[arg-type]
        except OSError as exc:
            self.refused.append(f"journal entry of {run_dir.name} refused: backup "
                                f"{change.backup} of {change.path!r} cannot be read "
                                f"({exc.strerror or exc})")
            return False
        with original:
            kept = change.backup.name[5:205]          # type: ignore[union-attr]
            name = f"{len(self.changes):04d}-{kept}"
            change.backup = self._save_backup(name, original)
        return True

    def _journalled(self, entry: dict, run_dir: Path) -> FileChange | None:
        """Return the FileChange a journal entry of run_dir describes, or None when the
        entry is refused (the reason goes to self.refused) or is a marker."""
        if "path" not in entry:
            return None             # {"reverted": true} and other markers
        try:
            rel, backup, dirs = journalled_paths(self.project, entry, run_dir / "backups",
                                                 self.guard)
            action, mode = entry.get("action"), entry.get("mode")
            if action not in ("created", "modified") or (action == "modified") != bool(backup):
                raise PathError(f"path {rel!r}: action {action!r} with backup "
                                f"{entry.get('backup')!r} is not one bridge writes")
            if mode is not None and (not isinstance(mode, int) or isinstance(mode, bool)
                                     or not 0 <= mode <= 0o7777):
                raise PathError(f"path {rel!r}: mode {mode!r} is not permission bits")
        except PathError as exc:
            self.refused.append(f"journal entry of {run_dir.name} refused: {exc}")
            return None
        return FileChange(rel, action, backup, mode, dirs)

    def _in_folder(self, rel: str, action: Callable[[int, str], None]) -> None:
        """Call action(fd, name) with the descriptor of rel's folder and rel's last part,
        when every folder on its way exists (walked without following symlinks)."""
        parts = plan_path_parts(rel)
        fd, depth = _walk(self._root(), parts[:-1], rel)
        try:
            if depth == len(parts) - 1:
                action(fd, parts[-1])
        finally:
            os.close(fd)

    def _remove_temps(self, rel: str) -> None:
        """Remove the temp files an interrupted write of rel left beside it."""
        def remove(fd: int, name: str) -> None:
            for entry in os.listdir(fd):
                if entry.startswith(f".{name}.") and entry.endswith(TEMP_SUFFIX):
                    with _suppress(OSError):
                        os.unlink(entry, dir_fd=fd)

        with _suppress(OSError, PathError):
            self._in_folder(rel, remove)

    def rollback(self) -> None:
        """Put every written path back, newest first: originals' bytes and modes
        (atomically), created files removed, then the run's folders if empty. The journal
        then says so, so no later takeover trusts those files. Raises RollbackError naming
        every path that could not be restored."""
        with self.lock:
            self.closed = True
            self._restore(list(self.changes.values()))
            append_jsonl(self.run_dir / JOURNAL_FILE, {"reverted": True})
        self.discard()

    def _restore(self, changes: list[FileChange]) -> None:
        failed = []
        for change in reversed(changes):
            try:
                self._restore_one(change)
                change.action = "reverted"
            except (OSError, PathError) as exc:
                failed.append(f"{change.path} ({getattr(exc, 'strerror', None) or exc})")
        if failed:
            raise RollbackError(f"could not restore {len(failed)} file(s): {', '.join(failed)}",
                                f"the originals are kept in {self.run_dir / 'backups'}")

    def _restore_one(self, change: FileChange) -> None:
        parts = self.check(change.path)
        if change.backup is not None:
            with open_regular(change.backup) as original:     # compared and copied in pieces
                fd, _ = _walk(self._root(), parts[:-1], change.path, make=True)
                try:
                    mode = _file_mode(fd, parts[-1], change.path)
                    same = mode is not None and _same_bytes(original, parts[-1], fd)
                    if mode == change.mode and same:
                        return          # never changed (the write failed): nothing to put back
                    original.seek(0)
                    _replace_in(fd, parts[-1], original, change.mode)
                finally:
                    os.close(fd)
            return

        def unlink(fd: int, name: str) -> None:
            with _suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)

        self._in_folder(change.path, unlink)
        for folder in reversed(change.created_dirs):
            # not empty (something else lives there now): left as it is
            with _suppress(OSError, PathError, ValueError):
                self._in_folder(folder.relative_to(self.project).as_posix(),
                                lambda fd, name: os.rmdir(name, dir_fd=fd))

    def discard(self) -> None:
        """Delete this run's backups, and those of the runs it took over."""
        for run in {self.run_dir, *self.old_runs}:
            self._drop_backups(run)
        self._release()

    @staticmethod
    def _drop_backups(run_dir: Path) -> None:
        remove_tree(run_dir / "backups")

    def summary(self) -> list[dict]:
        """Return [{"path", "action"}] for the result memory, in write order."""
        return [{"path": c.path, "action": c.action} for c in self.changes.values()]


###############################################################################
# 27. Review staging and bounded diffs
#
# A --review run writes nothing into the project: StagedFiles keeps each file under the
# run's folder (staged/PATH) for --apply. --diff and --apply show what changed as a unified
# diff (difflib), read only when both sides are at most DIFF_MAX_BYTES.
###############################################################################


def read_regular(path: Path) -> bytes | None:
    """Return a regular file's bytes, or None when it is missing or not a regular
    file (a symlink is not followed)."""
    try:
        with open_regular(path) as handle:
            return handle.read()
    except OSError:
        return None


def bounded_diff(rel: str, before: Path | None, now: Path | None, before_sha: str | None,
                 now_sha: str | None) -> str:
    """Return file_diff from the file at before to the file at now (None or missing: no
    such file), read only when both are at most DIFF_MAX_BYTES; else one line with the
    sizes (their sha256, before_sha and now_sha, still tell whether they differ)."""
    if before_sha == now_sha:
        return ""
    sizes = [_regular_size(path) for path in (before, now)]
    if max(size or 0 for size in sizes) > DIFF_MAX_BYTES:
        said = " and ".join(f"{size:,} bytes" for size in sizes if size is not None)
        return (f"(no diff of {rel}: {said}, over bridge's diff limit of {DIFF_MAX_BYTES:,} "
                "bytes; the sha256 values say whether it changed)\n")
    return file_diff(rel, read_regular(before) if before is not None else None,
                     read_regular(now) if now is not None else None)


def _regular_size(path: Path | None) -> int | None:
    """Return a regular file's size in bytes, or None (no path, missing, not regular)."""
    try:
        info = os.lstat(path) if path is not None else None
    except OSError:
        return None
    return info.st_size if info is not None and stat.S_ISREG(info.st_mode) else None


def file_diff(rel: str, before: bytes | None, now: bytes | None) -> str:
    """Return the unified diff (difflib) of one file from before to now (None: no such
    file), as a/REL and b/REL; for bytes that are not UTF-8, one "Binary files … differ"
    line."""
    import difflib

    if before == now:
        return ""
    old_name = "a/" + rel if before is not None else "/dev/null"
    new_name = "b/" + rel if now is not None else "/dev/null"
    try:
        old_text, new_text = (before or b"").decode("utf-8"), (now or b"").decode("utf-8")
    except UnicodeDecodeError:
        return f"Binary files {old_name} and {new_name} differ\n"
    lines = []
    for line in difflib.unified_diff(old_text.splitlines(keepends=True),
                                     new_text.splitlines(keepends=True), old_name, new_name):
        lines.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(lines)


class StagedFiles:
    """The files of a --review run: written under the run's folder (staged/PATH, 0600),
    never into the project; --apply writes them there later. Has FileTransaction's
    write(), close(), rollback(), discard(), summary() and changes.

    staged.jsonl records each write: {"step", "path", "action" (created | modified, as the
    project was), "base_sha256" (the project file's before its first staging, None when
    absent), "sha256"}; reads.json the sha256 of every LOAD file as the run found it.
    """

    def __init__(self, project: Path, run_dir: Path, crash_at: str | None = None):
        self.project, self.run_dir, self.crash_at = project, run_dir, crash_at
        self.changes: dict[str, FileChange] = {}
        self.lock = threading.Lock()
        self.closed = False

    def note_reads(self, files_context: dict[str, str]) -> None:
        """Record the sha256 of every LOAD file as it is in the project now (None: absent)."""
        reads = {}
        for rel, mode in files_context.items():
            if mode == "LOAD":
                reads[rel] = file_sha256(self.project / rel)     # in pieces: LOAD files may be huge
        write_json_file(self.run_dir / "reads.json", reads)

    def write(self, rel: str, text: str, step: int = 0) -> FileChange:
        """Stage text (UTF-8) for project/rel; return its FileChange. Raises PathError
        when rel leads outside the project, or the run is ending."""
        target = resolve_inside(self.project, rel)
        data = text.encode("utf-8")
        with self.lock:
            if self.closed:
                raise PathError(f"not staging {rel!r}: the run is ending")
            try:
                staged = self.run_dir / "staged" / rel
                private_dir(staged.parent)
                atomic_write(staged, data, 0o600)
            except OSError as exc:
                raise PathError(f"cannot stage {rel!r} in {self.run_dir}: "
                                f"{exc.strerror or exc}") from exc
            change = self.changes.get(rel)
            base = None
            if change is None:
                base = file_sha256(target)
                action = "created" if base is None else "modified"
                change = self.changes[rel] = FileChange(rel, action)
            append_jsonl(self.run_dir / STAGED_FILE, {
                "step": step, "path": rel, "action": change.action, "sha256": sha256_hex(data),
                "base_sha256": base})
        return change

    def recover(self, old_run_dir: Path, kept_steps: set[int]) -> list[str]:
        """Put back every file a killed run wrote in the project (a --review run keeps no
        dead run's files, whatever kept_steps says); return them."""
        return FileTransaction(self.project, self.run_dir, self.crash_at).recover(old_run_dir,
                                                                                 set())

    def path_of(self, rel: str) -> Path | None:
        """Return the staged copy of rel, or None when no step staged it."""
        return self.run_dir / "staged" / rel if rel in self.changes else None

    def close(self) -> None:
        """Refuse every later write."""
        with self.lock:
            self.closed = True

    def rollback(self) -> None:
        """Drop the staged files (the project was never touched)."""
        self.close()
        self.discard()

    def discard(self) -> None:
        """Delete the staged files."""
        remove_tree(self.run_dir / "staged")

    def summary(self) -> list[dict]:
        """Return [{"path", "action", "staged": True}] in staging order."""
        return [{"path": c.path, "action": c.action, "staged": True} for c in self.changes.values()]


###############################################################################
# 28. Kept runs: backups, diff, undo, review
#
# Beside FileTransaction's journal and backups, a run's folder holds run.json and
# written.jsonl (the sha256 of every file write), so --diff can tell a file changed since
# the run and --undo can refuse to overwrite it. The backups of the last keep_runs runs of
# a plan are kept. Only bridge writes these files, and each path read back is still
# checked: a run id by run_folder, a journal's paths by resolve_inside and journalled_paths.
###############################################################################


def write_run_info(run_dir: Path, plan_id: str, project: Path | None, started: str,
                   plan_hash: str | None = None) -> None:
    """Write run.json: {"plan_id", "run_id" (run_dir's name), "project" (absolute, or
    None), "started_at", "content_hash" (the plan memory's)}."""
    info = {"plan_id": plan_id, "run_id": run_dir.name, "started_at": started,
            "project": os.path.abspath(project) if project is not None else None,
            "content_hash": plan_hash}
    write_json_file(run_dir / RUN_INFO_FILE, info)


def foreign_run_reason(runs_dir: Path, run_id: str, record: PlanRecord) -> str | None:
    """Return why the run run_id (a run id run_folder accepts) is not the plan's own, so a
    take-over (--resume, --rerun of a stale plan) must not touch its files; None when its
    run.json names this plan (id and content hash) and project, or it left no folder."""
    folder = runs_dir / run_id
    if not os.path.lexists(folder):
        return None
    info = read_json_file(folder / RUN_INFO_FILE, or_none=True)
    context = record.plan.get("context") if isinstance(record.plan, dict) else None
    project = context.get("project") if isinstance(context, dict) else None
    usable = isinstance(project, str) and "\x00" not in project
    project = os.path.abspath(project) if usable else None
    if not isinstance(info, dict):
        why = (f"run {run_id} has no run.json naming this plan (a forged state, or a run from "
               "before bridge recorded it)")
    elif info.get("plan_id") == record.plan_id and info.get("content_hash") is None:
        return (f"run {run_id} was made by a bridge that did not record its plan's content "
                "hash; not taken over: its files are left alone")
    elif info.get("plan_id") != record.plan_id or info.get("content_hash") != record.content_hash:
        why = (f"run {run_id} is a run of plan {clip(repr(info.get('plan_id')), 80, 'id')} "
               f"({str(info.get('content_hash'))[:12]}), not of this plan "
               f"({record.content_hash[:12]}): the plan's state is forged")
    elif info.get("project") != project:
        why = (f"run {run_id} worked in {clip(repr(info.get('project')), 200, 'path')}, not in "
               f"this plan's project {project!r}: the plan's state is forged")
    else:
        return None
    return why + "; its files are left alone"


def record_written(run_dir: Path, rel: str, data: bytes, step: int) -> None:
    """Append {"step", "path", "sha256", "bytes"} of one file write to written.jsonl
    (fsynced), to tell later changes from it."""
    append_jsonl(run_dir / WRITTEN_FILE, {"step": step, "path": rel,
                                          "sha256": sha256_hex(data), "bytes": len(data)})


def _real_folder(path: Path) -> bool:
    """Whether path is a folder itself, not a symlink to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def keep_backups(run_dir: Path) -> None:
    """Make a finished run's backups private (files 0600, folder 0700), to keep for --undo."""
    backups = run_dir / "backups"
    if _real_folder(backups):
        os.chmod(backups, 0o700)
        for entry in os.scandir(backups):
            if entry.is_file(follow_symlinks=False):
                os.chmod(entry.path, 0o600)


def plan_runs(runs_dir: Path, plan_id: str) -> list[Path]:
    """Return the folders of a plan's runs (by their run.json), oldest first."""
    found = []
    with _suppress(FileNotFoundError):
        for entry in os.scandir(runs_dir):
            if re.fullmatch(RUN_ID_PATTERN, entry.name) and entry.is_dir(follow_symlinks=False):
                info = read_json_file(Path(entry.path) / RUN_INFO_FILE, or_none=True)
                if isinstance(info, dict) and info.get("plan_id") == plan_id:
                    found.append(Path(entry.path))
    # a run id sorts by its second only; run.json is written as the run starts
    return sorted(found, key=lambda p: (p.name[:16], (p / RUN_INFO_FILE).stat().st_mtime_ns,
                                        p.name))


def prune_backups(runs_dir: Path, plan_id: str, keep: int) -> list[str]:
    """Delete the backups of a plan's runs but the newest keep; return the run ids
    pruned. Transcripts and journals stay; those runs can no longer be undone."""
    older = plan_runs(runs_dir, plan_id)
    older = older[: max(0, len(older) - keep)]
    pruned = []
    for run_dir in older:
        if _real_folder(run_dir / "backups"):
            remove_tree(run_dir / "backups")
            pruned.append(run_dir.name)
    return pruned


def backups_usage(runs_dir: Path) -> dict:
    """Return {"runs": runs with backups, "bytes": their size} under runs_dir (symlinks
    not followed)."""
    runs = total = 0
    with _suppress(FileNotFoundError):
        for entry in os.scandir(runs_dir):
            backups = Path(entry.path, "backups")
            if not entry.is_dir(follow_symlinks=False) or not _real_folder(backups):
                continue
            runs += 1
            total += sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(backups)
                         if e.is_file(follow_symlinks=False))
    return {"runs": runs, "bytes": total}


def run_dir_of(runs_dir: Path, run_id: Any) -> Path:
    """Return the folder of an existing run run_id, checked by run_folder. Raises
    ConfigError for a value that is no run id of bridge's, BridgeError when there is no
    such run."""
    try:
        run_dir = run_folder(runs_dir, run_id)
    except PathError as exc:
        raise ConfigError(str(exc), "run ids are in bridge --show ID (run …) and are the "
                                    "folders of STATE_DIR/runs") from None
    if not run_dir.is_dir():
        raise BridgeError(f"no run {run_id} in {runs_dir}", "check --run and --state-dir")
    return run_dir


class KeptFile(namedtuple("KeptFile", "path action backup mode written_sha256")):
    """One path a run wrote, from its journal: path (relative to the project), action
    ("created" or "modified"), backup (the original's copy, or None), mode (the original's
    permission bits), written_sha256 (what the run last wrote, or None: not recorded)."""

    __slots__ = ()


class KeptRun:
    """What one finished run changed, read back from its folder (build with KeptRun.load):
    run_id, run_dir, plan_id, project (absolute Path, or None), files (list of KeptFile,
    in write order), reverted (the run put its files back itself), undone_at (ISO time of
    its --undo, or None); for a --review run, staged ({path: {"step", "action",
    "base_sha256", "sha256"}}, in staging order) and reads ({LOAD path: sha256 or None})."""

    def __init__(self, run_dir: Path, plan_id: str, project: Path | None):
        self.run_id, self.run_dir, self.plan_id, self.project = \
            run_dir.name, run_dir, plan_id, project
        self.files: list[KeptFile] = []
        self.reverted, self.undone_at = False, None
        self.staged: dict[str, dict] = {}
        self.reads: dict[str, Any] = {}

    @property
    def awaiting_review(self) -> bool:
        """True for a --review run whose staged files are not applied (nor dropped)."""
        return bool(self.staged) and not self.files and (self.run_dir / "staged").is_dir()

    @classmethod
    def load(cls, runs_dir: Path, run_id: Any, plan_id: str) -> "KeptRun":
        """Read and check run run_id of plan plan_id. Raises ConfigError for a malformed
        run id, BridgeError when the run is not there, is another plan's, predates
        run.json, or its journal is not bridge's."""
        run_dir = run_dir_of(runs_dir, run_id)
        info = read_json_file(run_dir / RUN_INFO_FILE, or_none=True)
        if not isinstance(info, dict):
            raise BridgeError(f"run {run_id} has no readable run.json (made by a bridge older "
                              "than --diff)", "only runs made since can be shown or undone")
        if info.get("plan_id") != plan_id:
            raise BridgeError(f"run {run_id} is a run of plan {info.get('plan_id')!r}, not "
                              f"{plan_id!r}",
                              f"pass that plan's id, or a run of {plan_id!r} with --run")
        project = Path(info["project"]) if isinstance(info.get("project"), str) else None
        if project is not None and not project.is_absolute():
            raise BridgeError(f"run {run_id}: run.json names a relative project {project}",
                              "remove that run")
        run = cls(run_dir, plan_id, project)
        run._read_journal()
        run._read_staging()
        return run

    def _read_journal(self) -> None:
        """files, reverted and undone_at from journal.jsonl, written.jsonl and undone.json."""
        written = {e["path"]: e.get("sha256") for e in read_jsonl(self.run_dir / WRITTEN_FILE)
                   if isinstance(e.get("path"), str)}
        entries = read_jsonl(self.run_dir / JOURNAL_FILE)
        self.files = [self._checked(e, written) for e in entries if "path" in e]
        self.reverted = any(e.get("reverted") for e in entries)
        undone = read_json_file(self.run_dir / "undone.json", or_none=True)
        self.undone_at = undone.get("undone_at") if isinstance(undone, dict) else None

    def _read_staging(self) -> None:
        """staged and reads of a --review run, from staged.jsonl and reads.json."""
        for entry in read_jsonl(self.run_dir / STAGED_FILE):
            if self.project is None or not isinstance(entry.get("path"), str):
                raise BridgeError(f"run {self.run_id}: staged.jsonl has an entry bridge did not "
                                  f"write: {entry!r}")
            resolve_inside(self.project, entry["path"])     # PathError for a path leaving it
            first = self.staged.setdefault(entry["path"], dict(entry))
            first["sha256"], first["step"] = entry.get("sha256"), entry.get("step")  # the last wins
        reads = read_json_file(self.run_dir / "reads.json", or_none=True)
        if isinstance(reads, dict):
            self.reads = {k: v for k, v in reads.items() if isinstance(k, str)}

    def _checked(self, entry: dict, written: dict) -> KeptFile:
        """Return a journal entry as a KeptFile once its paths are checked."""
        rel, action = entry.get("path"), entry.get("action")
        if self.project is None or not isinstance(rel, str) \
                or action not in ("created", "modified"):
            raise BridgeError(f"run {self.run_id}: its journal has an entry bridge did not "
                              f"write: {entry!r}", "the run cannot be shown or undone")
        resolve_inside(self.project, rel)     # PathError for a path leaving the project
        try:
            _, backup, _ = journalled_paths(self.project, entry, self.run_dir / "backups")
        except PathError as exc:
            raise PathError(f"run {self.run_id}: its journal is not bridge's: {exc}") from None
        mode = entry.get("mode") if isinstance(entry.get("mode"), int) else None
        return KeptFile(rel, action, backup, mode, written.get(rel))

    def diff(self) -> list[dict]:
        """Return, per file: path, action, original_sha256, written_sha256, current_sha256
        (None: missing now), changed_since_run, diff (bounded_diff from the original to the
        file as it is now)."""
        entries = []
        for kept in self.files:
            now_path = self.project / kept.path      # type: ignore[operator]  # files: a project
            before_path = kept.backup if kept.action == "modified" else None
            current_sha = file_sha256(now_path)
            original_sha = file_sha256(before_path) if before_path is not None else None
            if kept.action == "modified" and original_sha is None:
                diff = f"(the original of {kept.path} is no longer kept; no diff)\n"
            else:
                diff = bounded_diff(kept.path, before_path, now_path, original_sha, current_sha)
            entries.append({
                "path": kept.path, "action": kept.action, "original_sha256": original_sha,
                "written_sha256": kept.written_sha256, "current_sha256": current_sha,
                "changed_since_run": current_sha != kept.written_sha256, "diff": diff})
        return entries

    def staged_diff(self) -> list[dict]:
        """Return, per staged file: path, action, original_sha256 (the project file's when
        the run staged it), staged_sha256, current_sha256 (the project file's now, None:
        missing), changed_since_run, diff (bounded_diff: what --apply would change)."""
        entries = []
        for rel, entry in self.staged.items():
            now_path = self.project / rel        # type: ignore[operator]  # staging: a project
            staged_path = self.run_dir / "staged" / rel
            current_sha = file_sha256(now_path)
            entries.append({"path": rel, "action": entry.get("action"),
                            "original_sha256": entry.get("base_sha256"),
                            "staged_sha256": entry.get("sha256"), "current_sha256": current_sha,
                            "changed_since_run": current_sha != entry.get("base_sha256"),
                            "diff": bounded_diff(rel, now_path, staged_path, current_sha,
                                                 file_sha256(staged_path))})
        return entries

    def apply_conflicts(self) -> list[str]:
        """Return "PATH (why)" for every file the run read or would replace that
        changed in the project since the run; [] when --apply may go ahead."""
        found = [f"{e['path']} (to be replaced; changed since the run)"
                 for e in self.staged_diff() if e["changed_since_run"]]
        for rel, digest in self.reads.items():
            now = file_sha256(self.project / rel)        # type: ignore[operator]
            if rel not in self.staged and now != digest:
                found.append(f"{rel} (read by the run; changed since)")
        return found

    def apply(self, crash_at: str | None = None) -> list[dict]:
        """Write the staged files into the project through a FileTransaction of this run,
        recording each write's sha256; on any failure put back what was written and
        re-raise. Returns the summary. crash_at: the crash test hook (Config.crash_at)."""
        files = FileTransaction(self.project, self.run_dir, crash_at)      # type: ignore[arg-type]
        try:
            for rel, entry in self.staged.items():
                data = read_regular(self.run_dir / "staged" / rel)
                if data is None or sha256_hex(data) != entry.get("sha256"):
                    raise BridgeError(f"the staged copy of {rel} in {self.run_dir} is missing or "
                                      "changed",
                                      "reject the run (bridge --reject ID) and run it again")
                step = entry.get("step") if isinstance(entry.get("step"), int) else 0
                files.write(rel, data.decode("utf-8"), step)
                record_written(self.run_dir, rel, data, step)
        except BaseException:
            with shielded_signals(lambda text: None):
                files.rollback()
            raise
        keep_backups(self.run_dir)
        return files.summary()

    def undo(self, force: bool = False) -> list[str]:
        """Put back every file the run changed and remove what it created; return the
        paths put back. Raises BridgeError, changing nothing, naming each file changed
        since the run (unless force) or whose backup is gone; RollbackError when one could
        not be restored."""
        gone = [k.path for k in self.files
                if k.action == "modified" and (k.backup is None or file_sha256(k.backup) is None)]
        if gone:
            raise BridgeError(f"cannot undo run {self.run_id}: the originals of {len(gone)} "
                              f"file(s) are no longer kept: {', '.join(gone)}",
                              "backups are kept for the last runs of a plan only (--keep-runs, "
                              "BRIDGE_KEEP_RUNS)")
        project: Path = self.project      # type: ignore[assignment]  # files imply a project
        changed = [k.path for k in self.files if file_sha256(project / k.path) != k.written_sha256]
        if changed and not force:
            raise BridgeError(f"not undoing run {self.run_id}: {len(changed)} file(s) changed "
                              f"after the run: {', '.join(changed)}",
                              f"see them with bridge --diff {self.plan_id} --run {self.run_id}; "
                              "--force puts the originals back anyway")
        restored = FileTransaction(project, self.run_dir).recover(self.run_dir, set())
        self.undone_at = utc_now_iso()
        append_jsonl(self.run_dir / JOURNAL_FILE, {"reverted": True, "undone_at": self.undone_at})
        write_json_file(self.run_dir / "undone.json", {"undone_at": self.undone_at})
        return restored


###############################################################################
# 29. Prompts
# What each step sends: its messages, fitted to the model's context, and the
# feedback a retry carries.
###############################################################################


def estimate_tokens(messages: list[dict]) -> int:
    """Estimate the prompt tokens of chat messages without a tokenizer: one per
    CHARS_PER_TOKEN characters, plus 5 per message for the chat template (tokenizers of
    current models give 3.5-4.5 characters a token on English and code, so at 3.5 it
    errs on the large side)."""
    return sum(int(len(m["content"]) / CHARS_PER_TOKEN) + 5 for m in messages) + 3


# A prompt the server counts as fewer than this share of bridge's estimate, and fewer by
# at least PROMPT_CUT_MIN_TOKENS, was cut by the server. Real tokenizers give 3.5-4.5
# characters a token (CHARS_PER_TOKEN is 3.5), so a whole prompt counts 0.75-1.0 of the
# estimate; Ollama past its num_ctx keeps ~2,050 of 4,096 tokens (llm/llama_server.go).
PROMPT_CUT_RATIO = 0.5
# The most server tokens one estimated token may count for (ContextFit.calibrate): a
# prompt of digits alone runs ~1 character a token, 3.5 times the estimate. Counts of
# shorter prompts than CALIBRATE_MIN_TOKENS are not used (a chat template's own tokens
# would weigh too much).
MAX_CALIBRATION = 4.0
CALIBRATE_MIN_TOKENS = 256
PROMPT_CUT_MIN_TOKENS = 256


def prompt_cut(usage: dict | None, messages: list[dict]) -> str | None:
    """Return why a reply was to a cut prompt, or None: the server's usage
    ({"prompt_tokens", …}) counts far fewer prompt tokens than estimate_tokens of the
    messages sent (PROMPT_CUT_RATIO, PROMPT_CUT_MIN_TOKENS). Ollama cuts an over-long
    prompt silently and answers 200 (ollama#3839, #17889)."""
    if not usage or not isinstance(usage.get("prompt_tokens"), int):
        return None
    seen, sent = usage["prompt_tokens"], estimate_tokens(messages)
    if seen >= sent * PROMPT_CUT_RATIO or sent - seen < PROMPT_CUT_MIN_TOKENS:
        return None
    return (f"the server cut the prompt: it counted {seen} prompt tokens of the ~{sent} sent "
            "(bridge's estimate), so the model never saw most of it; give the model a larger "
            "context (Ollama: --base-url http://localhost:11434, whose native API sets num_ctx, "
            "or OLLAMA_CONTEXT_LENGTH; LM Studio: lms load KEY --context-length N) and pass "
            "--context-length so bridge fits prompts to it")


def prompt_budget(step: Step, context_length: int | None) -> int | None:
    """Return the prompt tokens that fit for a step in a context of context_length tokens
    (None: not known): the context less answer_tokens and any thinking_reserve."""
    if context_length is None:
        return None
    reserve = thinking_reserve(context_length) if step.thinking == "on" else 0
    return context_length - answer_tokens(step, context_length) - reserve


def thinking_asked(step: Step) -> str | None:
    """Return what a step asks of a thinking model: its "thinking" (or the plan's
    defaults.thinking), else "off" for a bounded step (its check is JSON, or its own
    max_tokens is at most a json step's default), else None (the server's default;
    split_reasoning takes any thinking out)."""
    if step.thinking:
        return step.thinking
    short = step.max_tokens is not None and step.max_tokens <= VALIDATION_TYPES["json"].max_tokens
    return "off" if short or output_schema(step.validation) is not None else None


def thinking_reserve(context_length: int | None) -> int:
    """Return the tokens kept for thinking on top of an answer's max_tokens:
    THINKING_RESERVE_TOKENS, at most a quarter of context_length (None: not known)."""
    if not context_length:
        return THINKING_RESERVE_TOKENS
    return min(THINKING_RESERVE_TOKENS, context_length // 4)


def answer_tokens(step: Step, context_length: int | None) -> int:
    """Return the max_tokens of a step's answer: the step's own, else its validation's
    (default_max_tokens), at most a quarter of context_length (tokens; None: not known)."""
    if step.max_tokens:
        return step.max_tokens
    default = default_max_tokens(step.validation)
    return min(default, context_length // 4) if context_length else default


class _Block:
    """One part of a step's prompt; body may be cut to fit the context when cuttable."""

    __slots__ = ("head", "body", "tail", "cuttable")

    def __init__(self, head: str, body: str = "", tail: str = "", cuttable: bool = False):
        self.head, self.body, self.tail, self.cuttable = head, body, tail, cuttable

    def render(self) -> str:
        return self.head + self.body + self.tail


def prompt_blocks(plan: Plan, step: Step, outputs: dict[int, str],
                  staged: Callable[[str], Path | None] | None = None) -> list[_Block]:
    """Return the parts of a step's user message: the objective, LOAD files (read now, so
    files earlier steps wrote are current), REFERENCE paths, the outputs of the steps it
    depends on (outputs: step id -> text), what answer form passes, and the task last (read
    just before the model answers: on SmolLM2-135M that took more values from the text;
    README, Small local models). staged: for a --review run, returns the staged copy of a
    project path (or None), read instead of the file."""
    blocks = []
    if plan.objective:
        blocks.append(_Block(f"Objective of the whole plan: {plan.objective}"))
    for rel, mode in plan.files_context.items():
        if mode != "LOAD":
            continue
        try:
            copy = staged(rel) if staged else None
            text = read_load_file(copy, rel) if copy else \
                read_load_file(plan.project / rel, rel, plan.project)  # type: ignore[operator]
        except FileNotFoundError:
            text = "(this file does not exist yet)"
        except (PathError, IsADirectoryError) as exc:   # it changed since the plan was checked
            text = f"(not included: {exc})"
        blocks.append(_Block(f"File {rel}:\n```\n", text, "\n```", cuttable=True))
    refs = [rel for rel, mode in plan.files_context.items() if mode == "REFERENCE"]
    if refs:
        blocks.append(_Block("Files you may refer to by name (not included): " + ", ".join(refs)))
    for dep in step.depends_on:
        blocks.append(_Block(f"Output of {plan.steps[dep].label}:\n```\n", outputs.get(dep, ""),
                             "\n```", cuttable=True))
    if step.file_output:
        blocks.append(_Block(f"Your answer will be written to the file {step.file_output}."))
    blocks.append(_Block(describe_validation(step.validation)))
    blocks.append(_Block(f"Task:\n{step.prompt}"))
    return blocks


def build_messages(plan: Plan, step: Step, outputs: dict[int, str],
                   budget_tokens: int | None = None) -> list[dict]:
    """Return the chat messages of a step's first attempt (fitted_messages)."""
    return fitted_messages(step, prompt_blocks(plan, step, outputs), budget_tokens)


def fitted_messages(step: Step, blocks: list[_Block], budget_tokens: int | None,
                    sources: list[str] | None = None) -> list[dict]:
    """Return the chat messages of a step's first attempt from its prompt_blocks: the
    step's (or plan default's) system prompt, else DEFAULT_SYSTEM_PROMPT, then the blocks.
    budget_tokens: the prompt tokens that fit, or None for no limit. Over it
    (estimate_tokens), LOAD files and dependency outputs are cut, the largest first, each
    keeping at least MIN_CUT_CHARS characters and a marker; the rest is never cut. Raises
    PromptTooLarge with the numbers when even that does not fit. sources: a list that gets
    the text a grounded answer copies from: each LOAD file and dependency output as sent,
    then the task."""
    system = {"role": "system", "content": step.system or DEFAULT_SYSTEM_PROMPT}
    sent: dict[int, str] = {}           # id(block) -> its body as sent, without the cut marker

    def messages() -> list[dict]:
        if sources is not None:
            sources[:] = [sent.get(id(b), b.body) for b in blocks if b.cuttable] + [step.prompt]
        return [system, {"role": "user", "content": "\n\n".join(b.render() for b in blocks)}]

    if budget_tokens is None:
        return messages()
    originals = {id(b): len(b.body) for b in blocks}
    while (excess := estimate_tokens(messages()) - budget_tokens) > 0:
        cuttable = [b for b in blocks if b.cuttable and len(b.body) > MIN_CUT_CHARS + 100]
        if not cuttable:
            raise PromptTooLarge(
                f"{step.label}: the prompt needs about {estimate_tokens(messages())} tokens, "
                f"more than the {budget_tokens} that fit the model's context once the "
                "answer's tokens are kept free",
                "load the model with a larger context (or pass --context-length), shorten the "
                "step, or lower its max_tokens")
        block = max(cuttable, key=lambda b: len(b.body))
        keep = max(MIN_CUT_CHARS, len(block.body) - int(excess * CHARS_PER_TOKEN) - 100)
        sent[id(block)] = sent.get(id(block), block.body)[:keep]
        block.body = (block.body[:keep] + f"\n[bridge: cut to {keep} of "
                      f"{originals[id(block)]} characters to fit the model's context]")
    return messages()


###############################################################################
# 30. Retry policy
# What makes a step's attempt retry, with what feedback and sampling; when a step
# escalates to another model, and with what prompt; a stream the server cut for
# another request is sent again (the transport's own retries are in the room
# "HTTP executors: requests and retries").
###############################################################################


def retry_sampling(schedule: str, step: Step, attempt: int) -> dict:
    """Return how attempt number attempt (1 is the first) of a step samples under a
    schedule of RETRY_SAMPLING: {"temperature"?, "seed"?, "repeat_penalty"?,
    "dry_multiplier"?}. Every attempt of "plain" samples as the step says; the first of
    the others too, but greedy when the step sets no temperature. Seeds are the attempt's
    number, so a rerun samples the same."""
    fields = {} if step.temperature is None else {"temperature": step.temperature}
    if schedule == "plain":
        return fields
    if attempt == 1:
        return fields or {"temperature": RETRY_TEMPERATURES[0]}
    floor = RETRY_TEMPERATURES[min(attempt - 1, len(RETRY_TEMPERATURES) - 1)]
    fields.update(temperature=max(floor, step.temperature or 0.0), seed=attempt)
    if schedule == "penalty":
        fields.update(repeat_penalty=RETRY_REPEAT_PENALTY, dry_multiplier=RETRY_DRY_MULTIPLIER)
    return fields


def fit_feedback(messages: list[dict], feedback: list[dict],
                 budget_tokens: int | None) -> list[dict]:
    """Return a retry's feedback messages cut to fit the budget with messages: the previous
    answer (the assistant message) is cut first, then left out with a note; the error
    itself is always kept."""
    feedback = list(feedback)
    if budget_tokens is None or len(feedback) != 2:
        return feedback
    excess = estimate_tokens(messages + feedback) - budget_tokens
    if excess <= 0:
        return feedback
    answer, note = feedback
    keep = len(answer["content"]) - int(excess * CHARS_PER_TOKEN) - 100
    if keep < MIN_CUT_CHARS:
        return [{"role": "user", "content": note["content"] + " (Your previous answer is left "
                 "out here: it does not fit the model's context.)"}]
    return [{"role": "assistant",
             "content": answer["content"][:keep] + " [bridge: cut to fit the context]"}, note]


class AttemptFailure(namedtuple("AttemptFailure", "message retryable feedback answer_invalid",
                                defaults=(True, (), False))):
    """Why an attempt failed: message (for the result), retryable (another attempt may
    help), feedback (messages appended to the next attempt's prompt), answer_invalid (the
    answer failed its own check, not a command or a write). Each way an attempt fails is
    one constructor."""

    __slots__ = ()

    @classmethod
    def final(cls, message: str) -> "AttemptFailure":
        """A failure another attempt cannot help (no key, not allowed, the spend cap, a
        prompt the server cut, a refused write, an interrupt): the attempts stop."""
        return cls(message, retryable=False)

    @classmethod
    def from_request(cls, exc: LLMError) -> "AttemptFailure":
        """A failed request: the server's own failure (LLMServerUnusable: the run stops)
        and a context overflow are final; anything else is retried."""
        if isinstance(exc, LLMServerUnusable):
            return cls.final(str(exc))
        if exc.context_overflow:
            hint = exc.hint or "load the model with a larger context length, or shorten the step"
            return cls.final(f"{exc} ({hint})")
        note = f"(bridge: the previous request failed: {exc}. Please answer the task again.)"
        return cls(str(exc), feedback=[{"role": "user", "content": note}])

    @classmethod
    def from_stop(cls, error: str, validation: dict) -> "AttemptFailure":
        """An output stopped before its end (degenerate, or at max_tokens): the next
        prompt says why, without the output (it would only be copied)."""
        note = (f"Your previous answer was rejected: {error}. {describe_validation(validation)} "
                "Reply again with a short, complete answer only.")
        return cls(error, feedback=[{"role": "user", "content": note}])

    @classmethod
    def _shown(cls, error: str, output: str, note: str, invalid: bool) -> "AttemptFailure":
        """A failure whose next prompt shows the answer (clipped), then note."""
        shown = clip(output, 20_000, "previous answer") or "(empty)"
        return cls(error, feedback=[{"role": "assistant", "content": shown},
                                    {"role": "user", "content": note}], answer_invalid=invalid)

    @classmethod
    def from_output(cls, error: str, output: str, validation: dict) -> "AttemptFailure":
        """A failed check: the next prompt shows the output and the error."""
        note = (f"Your answer was rejected: {error}. {describe_validation(validation)} "
                "Reply again with the corrected answer only.")
        return cls._shown(error, output, note, True)

    @classmethod
    def from_command(cls, run: CommandRun, output: str, file_output: str | None,
                     validation: dict | list) -> "AttemptFailure":
        """A failed command check: the next prompt shows the answer, the command and the
        end of its output (COMMAND_FEEDBACK_CHARS)."""
        text = run.output_tail.strip() or "(no output)"
        if len(text) > COMMAND_FEEDBACK_CHARS:
            text = (f"[bridge: the output's first {len(text) - COMMAND_FEEDBACK_CHARS} "
                    "characters are left out]\n" + text[-COMMAND_FEEDBACK_CHARS:])
        where = f"written to {file_output} and " if file_output else ""
        command = f"`{shell_words(run.argv)}`"
        why = run.error.removeprefix(command + " ")  # "failed (exit 1)", "did not finish within …"
        note = (f"Your answer was {where}checked with {command}, which {why}. "
                f"Its output:\n```\n{text}\n```\nFix your answer so that this check passes. "
                f"{describe_validation(validation)} Reply again with the corrected answer only.")
        return cls._shown(run.error, output, note, False)

    def retries(self, number: int, step: Step) -> bool:
        """True when attempt number (1 is the first) of step is followed by another on
        the same model: the failure is retryable and step.max_retries are not spent."""
        return self.retryable and number <= step.max_retries


def escalation_target(config: Config, plan: Plan) -> tuple[str | None, str | None]:
    """Return (the model reference a step whose attempts are spent escalates to, or None;
    why a named one is not used, or None): --escalate-to, else the plan's escalate_to,
    unless its executor is not allowed."""
    escalate_to = config.escalate_to or plan.escalate_to
    if escalate_to and (kind := _executor_of(escalate_to)) not in config.allowed_executors:
        return None, (f"escalation to {escalate_to} not used: the {kind} executor is not "
                      f"allowed (pass --allow-executor {kind})")
    return escalate_to, None


def escalation_messages(messages: list[dict], failures: list[tuple[str, str]]) -> list[dict]:
    """Return the prompt of a step's escalation: its first prompt (messages), the last
    message followed by each failed answer (clipped) and why it was rejected (failures:
    [(output, why)])."""
    tried = "\n\n".join(f"Attempt {n}:\n```\n{clip(output, 4000, 'answer') or '(no answer)'}"
                        f"\n```\nRejected because: {why}"
                        for n, (output, why) in enumerate(failures, 1))
    note = (f"\n\nA smaller model tried this step {len(failures)} time(s) and failed. Its "
            f"answers and why they were rejected:\n\n{tried}\n\nGive the correct answer.")
    return [*messages[:-1], {"role": "user", "content": messages[-1]["content"] + note}]


def resend_on_contention(send: Callable[[], Any], cancel: Any,
                         said: Callable[[LLMContention], None]) -> Any:
    """Return send(), sent again after each of CONTENTION_WAITS_S (seconds, jittered
    down to half) while the server cuts its stream for another request (LLMContention),
    and no more once cancel (a threading.Event) is set; said(exc) hears of each cut
    before its wait. Raises the last LLMContention."""
    import random

    for wait in (*CONTENTION_WAITS_S, None):
        try:
            return send()
        except LLMContention as exc:
            if wait is None or cancel.is_set():
                raise
            said(exc)
            cancel.wait(wait * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")


###############################################################################
# 31. Run records
# What a run keeps: each step's result and usage ledger, its transcript, the
# order steps report in, and the heartbeat that tells a live run from a dead one.
###############################################################################


class StepResult:
    """The outcome of one step, filled in while it runs. status: "skipped" until it runs,
    then "running", then succeeded | failed | skipped; output: the artifact once validated;
    duration_s, generation_s: seconds, in all and in model requests; usage:
    {prompt_tokens, completion_tokens}, usage_reported False when estimated; model: the one
    that answered; resumed: taken over from a killed run; cost_usd: real; ledger: per model
    reference ({requests, prompt_tokens, completion_tokens, cost_usd}); checks: each
    command run (CommandRun.as_dict and its attempt); attempt_log: per attempt {"attempt",
    "sampling" (the fields sent), "completion_tokens", "error" (None: passed), "thinking"
    (thinking_asked), "thinking_reserve_tokens", "reasoning_tokens"?, "reasoning_bytes"?,
    "response_format"? (the constraint's type, None: unconstrained)}."""

    FIELDS = ("id", "title", "status", "attempts", "output", "error", "file_output", "duration_s",
              "generation_s", "usage", "usage_reported", "model", "resumed", "cost_usd",
              "escalated_to", "escalation_saved", "ledger", "checks", "attempt_log")
    __slots__ = FIELDS

    def __init__(self, id: int, title: str):   # noqa: A002 - the plan's own word
        self.id, self.title, self.status, self.attempts = id, title, "skipped", 0
        self.output, self.error, self.file_output, self.duration_s = "", None, None, 0.0
        self.generation_s = self.cost_usd = 0.0
        self.escalated_to: str | None = None
        self.escalation_saved: bool | None = None
        self.ledger: dict[str, dict] = {}
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        self.usage_reported, self.model, self.resumed = True, None, False
        self.checks: list[dict] = []
        self.attempt_log: list[dict] = []

    def checkpoint(self) -> dict:
        """Return every field, whole, for the run's steps.jsonl."""
        return {name: getattr(self, name) for name in self.FIELDS}

    @classmethod
    def from_checkpoint(cls, entry: dict, title: str) -> "StepResult":
        """Rebuild a step from a steps.jsonl entry of a killed run, marked resumed."""
        result = cls(entry["id"], title)
        for name in cls.FIELDS[2:]:
            if name in entry:
                setattr(result, name, entry[name])
        result.resumed = True
        return result

    def as_dict(self, price_model: str = DEFAULT_PRICE_MODEL) -> dict:
        """Return the step entry of the result document (output clipped to
        STORED_OUTPUT_MAX_CHARS characters, marked), with tokens_per_s (completion tokens
        over generation seconds) and what the tokens would have cost on price_model."""
        speed = self.usage["completion_tokens"] / self.generation_s if self.generation_s else None
        return {"id": self.id, "title": self.title, "status": self.status,
                "attempts": self.attempts,
                "output": clip(self.output, STORED_OUTPUT_MAX_CHARS, "output"), "error": self.error,
                "file_output": self.file_output, "duration_s": round(self.duration_s, 3),
                "usage": dict(self.usage), "usage_reported": self.usage_reported,
                "tokens_per_s": round(speed, 1) if speed is not None else None,
                "cost_usd": self.cost_usd,
                "would_have_cost_usd": would_cost_usd(self.usage, price_model),
                "model": self.model, "resumed": self.resumed, "escalated_to": self.escalated_to,
                "escalation_saved": self.escalation_saved, "ledger": self.ledger,
                "checks": self.checks, "attempt_log": self.attempt_log}


class _StepLog:
    """Progress lines of a plan's steps: printed as they come (immediate), or each step's
    held and printed in step order, so the log of parallel steps reads the same whatever
    order they finished in."""

    def __init__(self, progress: Progress, order: list[int], immediate: bool):
        self.progress, self.order, self.immediate = progress, order, immediate
        self.lines: dict[int, list[tuple[bool, str]]] = {sid: [] for sid in order}
        self.finished: set[int] = set()
        self.next = 0
        self.lock = threading.Lock()

    def say(self, sid: int, text: str, detail: bool = False) -> None:
        """Print (or hold) one line of a step; detail lines show only at -v."""
        if self.immediate:
            (self.progress.detail if detail else self.progress.info)(text)
            return
        with self.lock:
            self.lines[sid].append((detail, text))

    def done(self, sid: int) -> None:
        """Mark a step finished and print every held line now in order."""
        if self.immediate:
            return
        with self.lock:
            self.finished.add(sid)
            while self.next < len(self.order) and self.order[self.next] in self.finished:
                for detail, text in self.lines.pop(self.order[self.next]):
                    (self.progress.detail if detail else self.progress.info)(text)
                self.next += 1


class RunLog:
    """A run's transcript: runs/<run_id>/step-<N>.jsonl under --state-dir, one file per
    step, in Claude Code's stream-json line format (code.claude.com/docs/en/headless).
    Lines: {"type": "system", "subtype": "init", …} once; per attempt the messages sent
    (a "system_prompt" system line with "sampling", then {"type": "user" | "assistant",
    "message": …}), a "constrained_output" system line for a grounded step, the answer
    with its usage, a "command" system line per command run and a "validation" one; last
    {"type": "result", …}. Flushed after an attempt's messages and after its check
    (readable while the model answers), not after every line, which costs a write each."""

    def __init__(self, run_dir: Path, run_id: str, plan_id: str, price_model: str):
        self.run_dir, self.run_id, self.plan_id = run_dir, run_id, plan_id
        self.price_model = price_model
        self.files: dict[int, Any] = {}     # step id -> its open transcript (one writer each)

    def _line(self, sid: int, entry: dict) -> None:
        _write_line(self.files[sid], entry, flush=False)     # flushed by sent() and checked()

    def start(self, step: Step, model: str, cwd: Path | None) -> None:
        """Open a step's transcript."""
        path = self.run_dir / f"step-{step.id}.jsonl"
        try:
            self.files[step.id] = open(path, "a", encoding="utf-8", opener=private_opener)
        except FileNotFoundError:
            private_dir(self.run_dir)
            self.files[step.id] = open(path, "a", encoding="utf-8", opener=private_opener)
        self._line(step.id, {"type": "system", "subtype": "init", "session_id": self.run_id,
                             "model": model, "cwd": str(cwd) if cwd else None, "tools": [],
                             "plan_id": self.plan_id, "step_id": step.id, "title": step.title})

    def sent(self, sid: int, attempt: int, messages: list[dict],
             sampling: dict | None = None) -> None:
        """Record the exact messages of one attempt, and on its system prompt line how it
        samples (sampling: the fields sent)."""
        for message in messages:
            if message["role"] == "system":
                line = {"type": "system", "subtype": "system_prompt", "attempt": attempt,
                        "text": message["content"]}
                self._line(sid, line if sampling is None else {**line, "sampling": sampling})
            else:
                text = [{"type": "text", "text": message["content"]}]
                self._line(sid, {"type": message["role"], "attempt": attempt,
                                 "session_id": self.run_id,
                                 "message": {"role": message["role"], "content": text}})
        self.files[sid].flush()

    def answer(self, sid: int, attempt: int, reply: Completion) -> None:
        """Record a streamed answer (as received, <think> included) and its usage; the
        reasoning fields' text first as a "thinking" block (Anthropic's content block
        type), and "response_format" (the constraint's type, or null)."""
        usage = reply.usage or {}
        content = [{"type": "thinking", "thinking": reply.reasoning}] if reply.reasoning else []
        message = {"role": "assistant", "model": reply.model,
                   "content": [*content, {"type": "text", "text": reply.text}],
                   "stop_reason": reply.finish_reason,
                   "usage": {"input_tokens": usage.get("prompt_tokens"),
                             "output_tokens": usage.get("completion_tokens")}}
        self._line(sid, {"type": "assistant", "attempt": attempt, "session_id": self.run_id,
                         "message": message, "response_format": reply.response_format})

    def constrained(self, sid: int, attempt: int, form: str, spans: int | None) -> None:
        """Record which constrained output a grounded step's attempt asked for: form
        "spans" (its string values one of spans candidates, span_schema), "schema" or
        "none" (no schema sent); spans None but for "spans"."""
        self._line(sid, {"type": "system", "subtype": "constrained_output", "attempt": attempt,
                         "form": form, "spans": spans})

    def checked(self, sid: int, attempt: int, error: str | None) -> None:
        """Record the validation outcome (or the request error) of one attempt."""
        self._line(sid, {"type": "system", "subtype": "validation", "attempt": attempt,
                         "ok": error is None, "error": error})
        self.files[sid].flush()

    def command(self, sid: int, attempt: int, run: CommandRun) -> None:
        """Record one command run (CommandRun.as_dict)."""
        self._line(sid, {"type": "system", "subtype": "command", "attempt": attempt,
                         **run.as_dict()})

    def end(self, result: StepResult) -> None:
        """Close a step's transcript with the result line."""
        ok = result.status == "succeeded"
        self._line(result.id, {
            "type": "result", "subtype": "success" if ok else "error_during_execution",
            "is_error": not ok,
            "result": result.output, "error": result.error, "status": result.status,
            "duration_ms": int(result.duration_s * 1000), "num_turns": result.attempts,
            "session_id": self.run_id, "total_cost_usd": 0,
            "would_have_cost_usd": would_cost_usd(result.usage, self.price_model),
            "usage": {"input_tokens": result.usage["prompt_tokens"],
                      "output_tokens": result.usage["completion_tokens"]}})
        self.files.pop(result.id).close()


class _Heartbeat:
    """Refresh a running plan's heartbeat_at every HEARTBEAT_INTERVAL_S seconds from a
    background thread with its own store connection, so another bridge can tell a
    live run from a dead one (PlanRecord.stale)."""

    def __init__(self, config: Config, record: PlanRecord, run_id: str):
        self.config, self.record, self.run_id = config, record, run_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="bridge-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_INTERVAL_S):
            try:
                with Store.open(self.config) as store:
                    if not store.heartbeat(self.record, self.run_id):
                        return          # the plan is no longer ours
            except BridgeError:
                pass                    # a missed beat is harmless; the next one retries

    def __enter__(self) -> "_Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=STORE_BUSY_TIMEOUT_S * 2)


def estimated_usage(reply: Completion, messages: list[dict], pieces: int) -> dict:
    """Return {"prompt_tokens", "completion_tokens"} estimated for a reply without usage to
    believe: the prompt by estimate_tokens, the answer by its streamed pieces, else by
    CHARS_PER_TOKEN."""
    return {"prompt_tokens": estimate_tokens(messages),
            "completion_tokens": pieces or int(len(reply.text) / CHARS_PER_TOKEN)}


def priced_reply(reply: Completion, messages: list[dict], pieces: int, model: str) -> Completion:
    """Return reply with a cost_usd: its own, else (counts its executor could not believe,
    or no price for the model it named) its usage (estimated_usage when unknown) at
    claude_price of the model that answered, else of model (the id asked for); 0 without a
    price. So a paid request with an absurd count still counts against --max-cost-usd."""
    if reply.cost_usd is not None:
        return reply
    price = claude_price(reply.model or "") or claude_price(model)
    usage = reply.usage or estimated_usage(reply, messages, pieces)
    return reply._replace(cost_usd=round(usage_cost_usd(usage, price), 6) if price else 0.0)


def _add_usage(result: StepResult, reply: Completion, messages: list[dict], pieces: int,
               model: str) -> None:
    """Add a reply's usage and real cost to a step, and to its ledger line for the
    model reference that answered; a reply without usage is estimated (estimated_usage,
    usage_reported False)."""
    if not reply.usage:
        result.usage_reported = False
    usage = reply.usage or estimated_usage(reply, messages, pieces)
    _add_to_ledger(result.ledger, model, {**usage, "requests": 1, "cost_usd": reply.cost_usd})
    for key in ("prompt_tokens", "completion_tokens"):
        result.usage[key] += usage[key]
    result.cost_usd = round(result.cost_usd + reply.cost_usd, 6)


def _add_to_ledger(ledger: dict, model: str, line: dict) -> None:
    into = ledger.setdefault(model, {"requests": 0, "prompt_tokens": 0,
                                     "completion_tokens": 0, "cost_usd": 0.0})
    for key in ("requests", "prompt_tokens", "completion_tokens"):
        into[key] += line[key]
    into["cost_usd"] = round(into["cost_usd"] + line["cost_usd"], 6)


def merge_ledgers(ledgers: Iterator[dict]) -> dict:
    """Sum per-step ledgers ({model: {requests, prompt_tokens, completion_tokens,
    cost_usd}}) into the plan's."""
    total: dict[str, dict] = {}
    for ledger in ledgers:
        for model, line in ledger.items():
            _add_to_ledger(total, model, line)
    return total


STEP_OUTCOMES = ("first_attempt", "after_retries", "on_escalation", "failed")


def step_outcome(result: StepResult) -> str:
    """Return how a step that ran ended (STEP_OUTCOMES): succeeded on its first
    attempt, after retries on the same model, only on its escalation, or failed."""
    if result.status != "succeeded":
        return "failed"
    if result.escalated_to and result.escalation_saved:
        return "on_escalation"
    return "first_attempt" if result.attempts == 1 else "after_retries"


def append_step_stats(state_dir: Path, entry: dict) -> None:
    """Append one step's record to state_dir/STATS_FILE (private, one JSON line, O_APPEND:
    lines of concurrent bridges do not mix). entry: {"ts", "plan_id", "run_id", "step_id",
    "model", "validation": [types], "outcome", "attempts", "tokens", "seconds"}. A file
    that cannot be written costs only this record."""
    with _suppress(OSError):
        private_dir(state_dir)
        with open(state_dir / STATS_FILE, "a", encoding="utf-8", opener=private_opener) as handle:
            _write_line(handle, entry)


def read_step_stats(path: Path) -> dict:
    """Return the --stats report of a STATS_FILE: {"stats_file", "steps" (records read),
    "skipped_lines" (lines that are not such records), "models": {model: {validation type:
    {"steps", "first_attempt", "after_retries", "on_escalation", "failed", "median_tokens",
    "median_s"}}}}. A step counts under each of its validation types. A missing file is an
    empty report."""
    from statistics import median

    groups: dict[str, dict[str, list[dict]]] = {}
    report: dict[str, Any] = {"stats_file": str(path), "steps": 0, "skipped_lines": 0, "models": {}}
    try:
        handle = open_regular(path, encoding="utf-8")     # not through a symlink, nor a FIFO
    except FileNotFoundError:
        return report
    except OSError as exc:
        raise BridgeError(f"cannot read {path}: {exc.strerror or exc}",
                          "it is bridge's own record of steps: remove it, or check --state-dir")
    with handle:
        for line in handle:
            try:
                entry = load_json(line)
            except ValueError:
                entry = None
            numbers = isinstance(entry, dict) and all(
                isinstance(entry.get(k), (int, float)) and not isinstance(entry.get(k), bool)
                for k in ("tokens", "seconds"))
            if not (numbers and isinstance(entry.get("model"), str)
                    and entry.get("outcome") in STEP_OUTCOMES
                    and isinstance(entry.get("validation"), list)
                    and all(isinstance(v, str) for v in entry["validation"])):
                report["skipped_lines"] += 1
                continue
            report["steps"] += 1
            for kind in dict.fromkeys(entry["validation"]):
                groups.setdefault(entry["model"], {}).setdefault(kind, []).append(entry)
    for model, kinds in sorted(groups.items()):
        report["models"][model] = {
            kind: {"steps": len(entries),
                   **{outcome: sum(1 for e in entries if e["outcome"] == outcome)
                      for outcome in STEP_OUTCOMES},
                   "median_tokens": median(e["tokens"] for e in entries),
                   "median_s": round(median(e["seconds"] for e in entries), 3)}
            for kind, entries in sorted(kinds.items())}
    return report


###############################################################################
# 32. The result document
# What a run leaves behind, built here alone from the facts its plan run gathers (README:
# "What bridge writes into the store"): the result memory (result_memory; the Store stores
# it as given, parse_result_content in the room "Store layouts" reads it back), the
# document --json and --show --json print, and the text of --show and of a run's end.
###############################################################################

RESULT_SUMMARY_STEPS = 20     # steps a result's summary names one by one; the rest are counted
RESULT_SUMMARY_FILES = 10


def run_savings(steps: list[StepResult], price_model: str) -> dict:
    """Return what a run's local work saved: local_tokens (prompt and completion tokens of
    PROBED executors), local_usage, would_have_cost_usd (those at price_model's prices),
    price_model, paid_usd, retries (attempts after a step's first, escalations not
    counted), escalations and escalations_saved."""
    local = {"prompt_tokens": 0, "completion_tokens": 0}
    for step in steps:
        for model, line in step.ledger.items():
            if executor_class(model).PROBED:
                for key in local:
                    local[key] += line[key]
    escalated = [s for s in steps if s.escalated_to]
    return {"local_tokens": local["prompt_tokens"] + local["completion_tokens"],
            "local_usage": local, "would_have_cost_usd": would_cost_usd(local, price_model),
            "price_model": price_model, "paid_usd": round(sum(s.cost_usd for s in steps), 6),
            "retries": sum(max(0, s.attempts - 1 - bool(s.escalated_to)) for s in steps),
            "escalations": len(escalated),
            "escalations_saved": sum(1 for s in escalated if s.escalation_saved)}


def savings_line(savings: dict) -> str:
    """Return a result's savings (run_savings) as one line for a person or a planner."""
    retries = savings["retries"]
    line = (f"savings: {savings['local_tokens']} tokens ran on the local model, "
            f"${savings['would_have_cost_usd']:.4f} at {savings['price_model']}'s prices "
            f"(the planner's own tokens not counted); "
            f"{retries} retr{'y' if retries == 1 else 'ies'}")
    if savings["escalations"]:
        line += (f", {savings['escalations']} escalated "
                 f"({savings['escalations_saved']} saved by it)")
    return line + f"; ${savings['paid_usd']:.4f} paid"


def ledger_lines(result: dict) -> list[str]:
    """Return a result's usage ledger as lines for a person: one per model, then which
    steps escalated and whether that saved them."""
    lines = ["  ledger:"]
    for model, line in result["ledger"].items():
        lines.append(f"    {model:<32} {line['requests']:>3} request(s) "
                     f"{line['prompt_tokens']:>8} in {line['completion_tokens']:>7} out  "
                     f"${line['cost_usd']:.4f}")
    for entry in result["escalations"]:
        verdict = "saved it" if entry["saved"] else "did not save it"
        lines.append(f"    step {entry['step']} escalated to {entry['model']}: {verdict}")
    return lines


def result_summary(result: dict) -> str:
    """Return the first lines of a stored result, plain text, for the memory server's
    embedding (which reads a memory's first few hundred words) and a planner reading
    search hits."""
    counts = result.get("counts") or {}
    project = result.get("project")
    project = f" in project {_summary_text(project, 100)}" if project else ""
    lines = [f"bridge result: plan {_summary_text(result['plan_id'], 130)} {result['status']}"
             f"{project} (run {result['run_id']})",
             f"objective: {_summary_text(result.get('objective'), 200)}",
             f"steps: {counts.get('succeeded', 0)} succeeded, {counts.get('failed', 0)} failed, "
             f"{counts.get('skipped', 0)} skipped"]
    steps = result.get("steps") or []
    for step in steps[:RESULT_SUMMARY_STEPS]:
        title = f" ({_summary_text(step.get('title'), 60)})" if step.get("title") else ""
        error = f": {_summary_text(step['error'], 160)}" if step.get("error") else ""
        lines.append(f"step {step['id']}{title}: {step['status']}{error}")
    if len(steps) > RESULT_SUMMARY_STEPS:
        lines.append(f"… and {len(steps) - RESULT_SUMMARY_STEPS} more step(s)")
    files = result.get("files") or []
    if files:
        shown = ", ".join(f"{_summary_text(f.get('path'), 120)} {f.get('action')}"
                          for f in files[:RESULT_SUMMARY_FILES])
        more = len(files) - RESULT_SUMMARY_FILES
        lines.append(f"files: {shown}" + (f" and {more} more" if more > 0 else ""))
    if result.get("error"):
        lines.append(f"error: {_summary_text(result['error'], 300)}")
    if isinstance(result.get("savings"), dict):
        lines.append(savings_line(result["savings"]))
    for problem in (result.get("problems") or [])[:5]:
        lines.append(f"problem: {_summary_text(problem, 200)}")
    return "\n".join(lines)


def result_content(result: dict) -> str:
    """Return the content of a result memory: result_summary(), a blank line, then the
    whole (redacted) document as one line of JSON, the last line (JSON escapes every
    newline, so nothing in the document can end it early; parse_result_content)."""
    result = redact(result)
    return result_summary(result) + "\n\n" + json.dumps(result, ensure_ascii=False)


def result_memory(result: dict) -> ResultMemory:
    """Return the ResultMemory of a result document: content (result_content), tags
    (bridge-result, plan:<id>, and the project's name, the tag the memory server's hooks
    inject memories by), metadata, the run id as conversation_id, the plan's final state."""
    tags = [RESULT_TAG, f"plan:{tag_safe(result['plan_id'])}"]
    if result.get("project"):
        tags.append(tag_safe(result["project"]))
    return ResultMemory(result_content(result), tags,
                        {"plan_id": result["plan_id"], "run_id": result["run_id"]},
                        result["run_id"], {"status": result["status"],
                                           "finished_at": result["finished_at"],
                                           "error": result["error"]})


def shown_result(document: dict, result_hash: str, state: dict, runs_dir: Path) -> dict:
    """Return a result document as bridge prints it (--json of a run, --show --json): the
    stored document, its result_hash (its memory's content_hash), what the plan's state
    says happened to that run since (undone_at, applied_at, rejected_at; state {}: none),
    and run_log made from the run id (the stored one is not a path; None when the run id
    is not bridge's)."""
    shown, run_id = {**document, "result_hash": result_hash}, document.get("run_id")
    if state.get("undone_run") == run_id and state.get("undone_at"):
        shown["undone_at"] = state["undone_at"]     # shown, not stored: the result is as run
    if state.get("run_id") == run_id:
        shown.update({k: state[k] for k in ("applied_at", "rejected_at") if state.get(k)})
    if "run_log" in document:       # None too when no folder was made (invalid, never ran)
        try:
            folder = run_folder(runs_dir, run_id)
        except PathError:
            folder = None
        shown["run_log"] = str(folder) if folder is not None and folder.is_dir() else None
    return shown


def show_document(found: tuple[dict, str], record: PlanRecord, replaced: list[tuple[str, str]],
                  runs_dir: Path) -> dict:
    """Return what --show --json prints: shown_result of found (document, result_hash),
    with status_now when the plan moved on from that run and replaced_runs [{"run_id",
    "status"}] (Store.replaced_runs)."""
    result = shown_result(*found, record.state, runs_dir)
    now = record.display_status
    if record.state.get("run_id") == result.get("run_id") and now != result.get("status") \
            and now not in ("stale", "in_progress"):
        result["status_now"] = now      # after --apply or --reject: the plan's real status
    if replaced:
        result["replaced_runs"] = [{"run_id": run, "status": status} for run, status in replaced]
    return result


def run_hint(record: PlanRecord, runs_dir: Path | None = None) -> str:
    """Return what runs a plan from where it is: --plan for a pending one, --resume or
    --rerun for a stale one (with runs_dir, a state naming a run not the plan's own is
    said to be forged: foreign_run_reason), --rerun for a finished one."""
    status, plan_id = record.display_status, record.plan_id
    run_id = record.state.get("run_id")
    ours = isinstance(run_id, str) and re.fullmatch(RUN_ID_PATTERN, run_id)
    if status == "stale" and runs_dir is not None and ours \
            and (why := foreign_run_reason(runs_dir, run_id, record)):
        return (f"its state is forged ({why}): start over with bridge --plan {plan_id} --rerun, "
                f"which touches none of that run's files, or drop it with bridge --cancel "
                f"{plan_id}")
    if status == "stale":
        return (f"its bridge died mid-run: take it over with bridge --plan {plan_id} --resume "
                f"(keeps finished steps) or start over with bridge --plan {plan_id} --rerun")
    if status == "in_progress":
        return "it is running now; see it with: bridge --list --all"
    if status == "awaiting_review":
        return (f"its files are staged, not written: bridge --diff {plan_id}, then "
                f"bridge --apply {plan_id} or bridge --reject {plan_id}")
    if status == "pending":
        return f"run it with: bridge --plan {plan_id}"
    return f"run it again with: bridge --plan {plan_id} --rerun"


def _check_line(check: dict) -> str:
    """One command run of a result for a person: command, outcome, seconds, last output line."""
    if check.get("ran") is False:
        return f"`{shell_words(check['argv'])}` not run: {check['error']}"
    attempt = f"attempt {check['attempt']}: " if "attempt" in check else ""
    last = (check.get("output_tail") or "").strip().splitlines()[-1:]
    outcome = "passed" if check["error"] is None else check["error"].split("` ", 1)[-1]
    return (f"{attempt}`{shell_words(check['argv'])}` {outcome} in {check['duration_s']:.2f} s"
            + (f" · {last[0][:200]}" if last and check["error"] else ""))


def _step_lines(step: dict) -> list[str]:
    """A result's step for a person (render_result); the output keeps its own lines."""
    title = f" ({step['title']})" if step.get("title") else ""
    lines = [printable(f"  step {step['id']}{title}: {step['status']} · {step['attempts']} "
                       f"attempt(s) · {step.get('duration_s', 0):.1f} s"
                       + (" · resumed" if step.get("resumed") else ""))]
    if step.get("error"):
        lines.append(printable(f"      error: {step['error']}"))
    if step.get("file_output"):
        lines.append(printable(f"      file: {step['file_output']}"))
    for check in step.get("checks") or []:
        lines.append(printable(f"      check: {_check_line(check)}"))
    output = (step.get("output") or "").strip()
    if output:
        shown = output if len(output) <= 600 else output[:600] + f" … ({len(output)} characters)"
        lines.append("      output: "
                     + printable(shown, multiline=True).replace("\n", "\n              "))
    return lines


def render_result(result: dict) -> str:
    """Return a stored result document as text for a person; every line goes through
    printable()."""
    usage = result.get("usage") or {}
    lines: list[str] = []

    def add(line: str) -> None:
        lines.append(printable(line))

    if result.get("status_now"):
        add(f"plan {result['plan_id']}: {result['status_now']} (run {result.get('run_id')}, "
            f"which ended {result['status']})")
    else:
        add(f"plan {result['plan_id']}: {result['status']} (run {result.get('run_id')})")
    if result.get("objective"):
        add(f"  objective: {result['objective']}")
    speed = f" · {result['tokens_per_s']} tok/s" if result.get("tokens_per_s") else ""
    add(f"  model {result.get('model')} at {result.get('base_url')} · {result.get('started_at')}"
        f" · {result.get('duration_s', 0):.1f} s · {usage.get('prompt_tokens', 0)} prompt + "
        f"{usage.get('completion_tokens', 0)} completion tokens{speed}")
    if "would_have_cost_usd" in result:
        add(f"  cost: $0 here; ${result['would_have_cost_usd']:.4f} on {result.get('price_model')}")
    if result.get("error"):
        add(f"  error: {result['error']}")
    for key, what in (("undone", "its files were put back (bridge --undo)"),
                      ("applied", "its staged files were written (bridge --apply)"),
                      ("rejected", "its staged files were dropped (bridge --reject)")):
        if result.get(f"{key}_at"):
            add(f"  {key} at {result[key + '_at']}: {what}")
    for problem in result.get("problems") or []:
        add(f"  problem: {problem}")
    for step in result.get("steps", []):
        lines += _step_lines(step)
    if result.get("verify"):
        add(f"  verify: {_check_line(result['verify'])}")
    staged = " (staged, dropped at --reject: not written)" if result.get("rejected_at") else \
        " (staged, written at --apply)" if result.get("applied_at") else " (staged, not written)"
    for change in result.get("files", []):
        add(f"  file {change['path']}: {change['action']}"
            + (staged if change.get("staged") else ""))
    if result.get("run_log"):
        add(f"  run log: {result['run_log']}")
    return "\n".join(lines)


def render_show(result: dict, record: PlanRecord, runs_dir: Path) -> str:
    """Return what --show prints of show_document's result: render_result, the runs of
    contents replaced by --submit --replace, and what to do now when it is stale or
    awaiting review."""
    lines = [render_result(result)]
    for entry in result.get("replaced_runs") or []:
        lines.append(printable(f"  replaced content: run {entry['run_id']} ({entry['status']}) "
                               "ran an earlier content of this plan"))
    if record.display_status in ("stale", "awaiting_review"):
        lines.append(printable(f"  now: {record.display_status}; {run_hint(record, runs_dir)}"))
    return "\n".join(lines)


###############################################################################
# 33. Step scheduling
# Which step runs when: dependency order, at most N at once, halts and skips.
###############################################################################


def step_graph(plan: Plan) -> dict[int, set[int]]:
    """Return {step id: ids it waits for}: its depends_on, plus, for steps writing the
    same file, the previous writer in sequential order (parallel steps never race on a
    file, and the last writer is always the same)."""
    graph = {sid: set(plan.steps[sid].depends_on) for sid in sorted(plan.steps)}
    writers: dict[str, int] = {}
    for sid in sequential_order(graph):
        target = plan.steps[sid].file_output
        if target:
            if target in writers:
                graph[sid].add(writers[target])
            writers[target] = sid
    return graph


def sequential_order(graph: dict[int, set[int]]) -> list[int]:
    """Return the order steps run in one at a time: the lowest id that is ready next,
    so a plan whose dependencies point to lower ids runs (and prints) in step order."""
    order, out = TopologicalSorter(graph), []
    order.prepare()
    ready: list[int] = []
    while order.is_active():
        for sid in order.get_ready():
            heapq.heappush(ready, sid)
        sid = heapq.heappop(ready)
        out.append(sid)
        order.done(sid)
    return out


class StepScheduler:
    """Runs a plan's steps in dependency order (graph: step_graph), up to `parallel` at
    once in threads; with 1, one by one in the calling thread. A failed `halt` step stops
    new steps from starting; steps already running finish and their results count. Steps
    that succeeded in a killed run are not sent again; a step whose dependency did not
    succeed is skipped, saying which. run: the PlanRun: run.run_step(step, result,
    outputs, position) runs one step's attempts and fills result; run.step_ended(result)
    hears of every step that is over; run.cancel (a threading.Event) is set when the run
    stops early, for steps still running to see."""

    def __init__(self, graph: dict[int, set[int]], parallel: int, run: "PlanRun"):
        self.plan, self.graph, self.results = run.plan, graph, run.results
        self.parallel, self.log, self.cancel = max(1, parallel), run.log, run.cancel
        self.run_step, self.ended = run.run_step, run.step_ended
        self.outputs: dict[int, str] = {}
        self.ready: list[int] = []
        self.running: set[int] = set()
        self.halted_at: int | None = None
        self.failed: list[int] = []
        self.started = 0

    def run(self, checkpoint: Callable[[StepResult], None]) -> str | None:
        """Run every step; checkpoint(result) saves each finished one. Returns the
        plan's error, or None when no step failed. Re-raises what stopped it."""
        order = TopologicalSorter(self.graph)
        order.prepare()
        finished: queue.Queue = queue.Queue()
        try:
            while order.is_active():
                self.ready = sorted([*self.ready, *order.get_ready()])   # lowest id first
                self._start_ready(order, finished, checkpoint)
                if self.running:
                    self._collect(order, finished, checkpoint)
        except BaseException:
            self.cancel.set()           # steps still running must not touch results or files
            raise
        if self.halted_at is not None:
            return f"step {self.halted_at} failed and halted the plan"
        if self.failed:
            return f"step(s) {', '.join(map(str, sorted(self.failed)))} failed"
        return None

    def _start_ready(self, order: Any, finished: Any,
                     checkpoint: Callable[[StepResult], None]) -> None:
        """Start ready steps while slots are free; settle those that need no request."""
        while self.ready and len(self.running) < self.parallel:
            sid = self.ready.pop(0)
            step, result = self.plan.steps[sid], self.results[sid]
            if result.status == "succeeded":
                self.outputs[sid] = result.output
                self.log.say(sid, f"  {step.label}: succeeded in the run taken over; "
                             "not sent again")
            elif blocked := self._blocked_reason(step):
                result.error = blocked
                self.log.say(sid, f"  {step.label}: skipped ({blocked})")
                checkpoint(result)
            else:
                self.started += 1
                result.status = "running"
                self.running.add(sid)
                work = (step, result, dict(self.outputs), self.started, finished)
                if self.parallel == 1:
                    self._worker(*work)
                else:
                    threading.Thread(target=self._worker, args=work, daemon=True,
                                     name=f"bridge-step-{sid}").start()
                continue
            self.ended(result)
            self.log.done(sid)
            order.done(sid)

    def _collect(self, order: Any, finished: Any, checkpoint: Callable[[StepResult], None]) -> None:
        """Wait for one running step to finish and settle it."""
        sid, exc = self._next_finished(finished)
        self.running.discard(sid)
        if exc is not None:
            raise exc
        step, result = self.plan.steps[sid], self.results[sid]
        if result.status == "succeeded":
            self.outputs[sid] = result.output
        elif step.on_failure != "skip":
            self.failed.append(sid)
            if step.on_failure == "halt" and self.halted_at is None:
                self.halted_at = sid
        checkpoint(result)
        self.ended(result)
        self.log.done(sid)
        order.done(sid)

    def _worker(self, step: Step, result: StepResult, outputs: dict[int, str], position: int,
                finished: Any) -> None:
        """Run one step and report (step id, None or the exception) on finished."""
        try:
            self.run_step(step, result, outputs, position)
        except BaseException as exc:     # handed to the scheduling thread, which re-raises it
            finished.put((step.id, exc))
            return
        finished.put((step.id, None))

    @staticmethod
    def _next_finished(finished: Any) -> tuple[int, BaseException | None]:
        """Wait for the next finished step, staying responsive to Ctrl-C."""
        while True:
            try:
                return finished.get(timeout=0.1)
            except queue.Empty:
                continue

    def _blocked_reason(self, step: Step) -> str | None:
        if self.cancel.is_set():            # the run stops (the model server failed): start nothing
            return "not run: the run stopped"
        if self.halted_at is not None:
            return f"not run: step {self.halted_at} failed and halted the plan"
        for dep in step.depends_on:
            if self.results[dep].status != "succeeded":
                verb = "failed" if self.results[dep].status == "failed" else "was skipped"
                return f"dependency {dep} {verb}"
        return None


class ContextPool:
    """The tokens of one context that the requests in flight share (capacity: tokens;
    thread-safe): llama.cpp's slots with unified KV (its default, auto slots: each slot's
    n_ctx is the whole -c; PR #16736, #23652) and LM Studio's parallel predictions
    (lms#565) run out of it together, and llama.cpp then ends every slot with 500 "Context
    size has been exceeded"."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self._free = threading.Condition()

    def acquire(self, tokens: int, cancel: Any) -> int:
        """Wait until tokens (at most the whole capacity) are free, or cancel (a
        threading.Event) is set; take them and return how many were taken."""
        tokens = max(1, min(tokens, self.capacity))
        with self._free:
            while self.used + tokens > self.capacity and not cancel.is_set():
                self._free.wait(0.1)
            self.used += tokens
        return tokens

    def release(self, tokens: int) -> None:
        """Give back tokens taken by acquire."""
        with self._free:
            self.used -= tokens
            self._free.notify_all()


###############################################################################
# 34. The model's context
# What prompts and answers are fitted to, learned across the plans of one
# process: the default model's context and slots, the server's tokens per
# estimated token, the models seen thinking.
###############################################################################


class ContextFit:
    """What this process knows of the default model's context (every plan it runs shares
    it). model: the default model id; context_length: tokens, or None (not known);
    parallel: steps in flight; calibration: the server's tokens per estimated token;
    pool: a ContextPool when the slots share one context, else None; reprobe: LM Studio
    loaded the model on demand (JIT): probe once a reply came; client: the LLMClient, or
    None."""

    __slots__ = ("config", "client", "model", "progress", "context_length", "parallel",
                 "calibration", "pool", "reprobe", "_thinkers", "_reprobe_lock")

    def __init__(self, config: Config, client: "LLMClient | None", model: str | None,
                 progress: Progress):
        self.config, self.client, self.model, self.progress = config, client, model, progress
        self.context_length: int | None = None
        self.parallel, self.calibration = 1, 1.0
        self.pool: ContextPool | None = None
        self.reprobe = False
        self._thinkers: set[str] = set()
        self._reprobe_lock = threading.Lock()

    def context_of(self, model: str) -> int | None:
        """Return the context (tokens) a model's prompts are fitted to: the default model's,
        else None."""
        return self.context_length if model == self.model else None

    def budget(self, step: Step, model: str) -> int | None:
        """Return the prompt tokens that fit for a step (prompt_budget over calibration), or
        None when the context is unknown."""
        budget = prompt_budget(step, self.context_of(model))
        return int(budget / self.calibration) if budget is not None else None

    def calibrate(self, model: str, messages: list[dict], counted: int | None) -> bool:
        """Learn the server's tokens per estimated token (calibration, 1 to MAX_CALIBRATION)
        from its count of messages of at least CALIBRATE_MIN_TOKENS (its tokenizer, or a
        reply's usage.prompt_tokens): number-dense text runs 1.85 characters a token on
        SmolLM2's tokenizer, not 3.5. Returns True when the default model's budget shrank."""
        estimate = estimate_tokens(messages)
        if model != self.model or not isinstance(counted, int) or self.context_length is None \
                or estimate < CALIBRATE_MIN_TOKENS:
            return False
        ratio = min(counted / estimate, MAX_CALIBRATION)
        if ratio <= self.calibration * 1.02:
            return False
        self.calibration = ratio
        return True

    def max_tokens(self, step: Step, model: str, messages: list[dict]) -> int:
        """Return the max_tokens of one request: answer_tokens plus reserve, capped by the
        context the prompt leaves (estimate_tokens times calibration) when it is known."""
        context = self.context_of(model)
        limit = answer_tokens(step, context) + self.reserve(step, model)
        if not context:
            return limit
        return max(1, min(limit, context - int(estimate_tokens(messages) * self.calibration)))

    def reserve(self, step: Step, model: str) -> int:
        """Return the thinking reserve of a step's requests on a model (tokens):
        thinking_reserve when the step asks for thinking or the model was seen thinking."""
        if step.thinking != "on" and model not in self._thinkers:
            return 0
        return thinking_reserve(self.context_of(model))

    def thinks(self, model: str) -> None:
        """Remember that a model thought: its later requests keep the reserve."""
        self._thinkers.add(model)

    def learn_context(self, message: str) -> None:
        """Take the context a server names in its overflow error (llama-cpp-python and
        vLLM "maximum context length is N tokens", llama.cpp "context size (N tokens)",
        LM Studio "n_ctx: N") when it reported none: the steps sent after it fit it."""
        found = re.search(r"maximum context length is (\d+)|context size \((\d+) tokens"
                          r"|n_ctx: (\d+)|context length of only (\d+)", message)
        number = next((int(g) for g in found.groups() if g), 0) if found else 0
        if number >= 64:
            self.context_length = number
            self.progress.info(f"the server's context is {number} tokens (from its error): "
                               "the steps sent from now on are fitted to it")

    def reprobe_loaded(self, model: str) -> None:
        """Once a reply came from a model LM Studio loaded on demand (JIT), read the context
        and parallel slots it was loaded with (JIT loads ignore saved settings and often get
        4,096: lmstudio-bug-tracker #1463, #2174; hermes-agent PR #79354 re-reads the same
        way): the steps sent after this fit them."""
        with self._reprobe_lock:
            if not self.reprobe:
                return
            self.reprobe = False
        try:
            info = self.client.probe()
        except LLMError:
            return
        if model != self.model or info.loaded != parse_model_ref(model)[1]:
            return
        self.context_length = self.config.context_length or info.context_length
        self.parallel = self.config.parallel or info.parallel or 1
        self.progress.info(f"model {info.loaded} is loaded now: context "
                           f"{info.context_length or 'not reported'}, "
                           f"{info.parallel or 1} slot(s); "
                           "the steps sent from now on are fitted to them")


###############################################################################
# 35. An attempt
# One request of a step as it is sent and streamed: its progress, its watched
# answer and thinking, and what it thought.
###############################################################################


class Attempt:
    """One request of a step. number: 1 for the first; model: the model reference asked;
    messages: the prompt (redacted); sampling: the fields of retry_sampling, then those
    sent; started: time.monotonic(); pieces, thought: streamed pieces of answer and of
    thinking (the token estimate when the server sends no usage); guard, thinking_guard:
    DegenerationGuards of a WATCHED executor, else None. Set by StepRun._prepare:
    executor, name (the model name it is asked by), local (a PROBED executor), thinking
    (thinking_asked), reserve (thinking tokens) and schema (the output schema sent)."""

    __slots__ = ("step_run", "number", "model", "messages", "sampling", "started", "pieces",
                 "guard", "thought", "thinking_guard", "executor", "name", "local", "thinking",
                 "reserve", "schema")

    def __init__(self, step_run: "StepRun", number: int, model: str, messages: list[dict],
                 sampling: dict | None = None):
        self.step_run, self.number, self.model, self.sampling = step_run, number, model, sampling
        self.messages = redact(messages)    # no secret of bridge's environment reaches a model
        self.started, self.pieces, self.guard = time.monotonic(), 0, None
        self.thought, self.thinking_guard = 0, None
        self.executor, self.name, self.local = None, model, False
        self.thinking, self.reserve, self.schema = None, 0, None

    def _status(self, what: Callable[[float], str]) -> None:
        """Show the attempt on the progress line, ending with what(seconds since it started)."""
        run, step = self.step_run.run, self.step_run.step
        elapsed = time.monotonic() - self.started
        run.progress.status(f"{run.where(step)} · {step.title or f'step {step.id}'} · attempt "
                            f"{self.number} · {elapsed:.1f} s · {what(elapsed)}")

    def on_delta(self, piece: str) -> None:
        """Take one streamed piece: watch it (raises OutputDegenerate: the stream is
        closed on the way out), emit it as an event, show the attempt's progress."""
        self.pieces += 1
        if self.guard is not None:
            self.guard.feed(piece)
        run = self.step_run.run
        run.runner.events.emit("delta", run.plan.id, self.step_run.step.id,
                               attempt=self.number, text=piece)
        self._status(lambda elapsed: f"{self.pieces / max(elapsed, 1e-6):.1f} tok/s")

    def on_reasoning(self, piece: str) -> None:
        """Take one streamed piece of thinking: count it, show it on the progress line and
        watch it (raises OutputDegenerate naming the thinking)."""
        self.thought += 1
        self._status(lambda elapsed: f"thinking · {self.thought} tokens")
        if self.thinking_guard is not None:
            try:
                self.thinking_guard.feed(piece)
            except OutputDegenerate as exc:
                why = str(exc).replace("stopped:", "stopped while thinking:", 1)
                raise OutputDegenerate(why) from None

    def thought_of(self, reply: Completion, inline: str) -> tuple[int, int]:
        """Record what the attempt thought (reasoning fields, and inline: reasoning inside
        content). Returns its tokens and the answer's (its pieces less the thinking inside
        content). Tokens: the reasoning fields' streamed pieces, and the share of the
        content's pieces inline's characters are (else CHARS_PER_TOKEN for either)."""
        text = reply.reasoning + inline
        if not text:
            return 0, self.pieces
        fields = reply.reasoning_pieces or int(len(reply.reasoning) / CHARS_PER_TOKEN)
        if self.pieces and inline:
            within = round(self.pieces * len(inline) / len(reply.text))
        else:
            within = int(len(inline) / CHARS_PER_TOKEN)
        tokens = max(1, fields + within)
        self._record_thought(tokens, text)
        self.step_run.say(f"  {self.step_run.step.label}: the model thought for {tokens} tokens",
                          detail=True)
        return tokens, max(0, self.pieces - within)

    def _record_thought(self, tokens: int, text: str) -> None:
        """Put reasoning_tokens and reasoning_bytes on the step's attempt_log entry; remember
        the model thinks."""
        size = len(text.encode("utf-8", "replace"))
        self.step_run.result.attempt_log[-1].update(reasoning_tokens=tokens, reasoning_bytes=size)
        self.step_run.runner.fit.thinks(self.model)

    def thought_cut(self) -> None:
        """Record the thinking of an attempt cut while it streamed."""
        if self.thought and self.thinking_guard is not None:
            self._record_thought(self.thought, self.thinking_guard.text)

    def cut_thinking(self, limit: Any, thought: int, answered: int) -> str:
        """Say how an attempt that thought was cut at max_tokens (limit): what thinking
        spent (thought: tokens), whether an answer began (answered: its tokens, 0: none),
        and what the next attempt keeps for thinking."""
        reserve = self.step_run.runner.fit.reserve(self.step_run.step, self.model)
        answer = f"the answer was cut after {answered} tokens" if answered else "no answer"
        if self.thinking == "off":
            after = (f"asked not to think, the model thought anyway; the next attempt keeps up "
                     f"to {reserve} tokens for thinking")
        elif self.thinking == "on":
            after = f"thinking had up to {reserve} tokens of it; raise the step's max_tokens"
        else:
            after = f"the next attempt keeps up to {reserve} tokens for thinking"
        return (f"stopped at max_tokens={limit}: spent {thought} of {limit} tokens thinking; "
                f"{answer} ({after})")

    def stopped(self, why: str) -> AttemptFailure:
        """Record an attempt whose output degenerated and was cut (its tokens estimated:
        the server sent no usage); return its AttemptFailure."""
        step_run = self.step_run
        text = self.guard.text if self.guard is not None else ""
        thought = self.thinking_guard.text if self.thinking_guard is not None else ""
        reply = Completion(text, None, None, "cancelled", 0.0, 0.0, thought, self.thought)
        step_run.run.runlog.answer(step_run.step.id, self.number, reply)
        _add_usage(step_run.result, reply, self.messages, self.pieces + self.thought, self.model)
        step_run.result.output = split_reasoning(text)[0]
        step_run.run.runlog.checked(step_run.step.id, self.number, why)
        return AttemptFailure.from_stop(why, step_run.step.validation)


###############################################################################
# 36. A step run
# One step from its first prompt to its settled result: its attempts (prompt,
# send, check, write, commands, put back), then its escalation.
###############################################################################


class StepRun:
    """One step of a plan run, to its settled result (run.results[step.id]).
    outputs: step id -> output, of the steps it reads."""

    __slots__ = ("run", "runner", "step", "result", "outputs", "say")

    def __init__(self, run: "PlanRun", step: Step, outputs: dict[int, str]):
        self.run, self.runner, self.step = run, run.runner, step
        self.result, self.outputs = run.results[step.id], outputs
        self.say = functools.partial(run.log.say, step.id)

    def run_step(self, position: int) -> None:
        """Run the step's attempts (position: its place in the order steps started);
        then its STATS_FILE record."""
        run, step, result = self.run, self.step, self.result
        plan, model = run.plan, step.model or self.runner.model
        result.status, result.file_output, result.model = "running", step.file_output, model
        run.positions[step.id] = position
        run.runlog.start(step, model, plan.project)
        self.runner.events.emit("step_start", plan.id, step.id, title=step.title,
                                position=position, steps=len(plan.steps),
                                max_attempts=step.max_retries + 1, model=model)
        try:
            self._attempts()
        finally:
            run.runlog.end(result)
        if result.attempts and not run.cancel.is_set():     # interrupted: not counted
            append_step_stats(run.config.runs_dir.parent, {
                "ts": utc_now_iso(), "plan_id": plan.id, "run_id": run.run_id, "step_id": step.id,
                "model": model,
                "validation": [v.get("type") for v in validations_of(step.validation)],
                "outcome": step_outcome(result), "attempts": result.attempts,
                "escalated_to": result.escalated_to,
                "tokens": result.usage["prompt_tokens"] + result.usage["completion_tokens"],
                "seconds": round(result.duration_s, 3)})

    def _first_prompt(self) -> list[dict] | None:
        """Return the step's first prompt, or None (the step settled failed or skipped)
        when it does not fit the model's context or its commands may not run here. A
        prompt the server counts larger is fitted again (calibrate)."""
        run, step, result, fit = self.run, self.step, self.result, self.runner.fit
        staged = run.files.path_of if run.staged else None

        def build() -> list[dict]:
            run.sources[step.id] = []
            blocks = prompt_blocks(run.plan, step, self.outputs, staged)
            return fitted_messages(step, blocks, fit.budget(step, result.model),
                                   run.sources[step.id])
        try:
            messages = build()
            counted = fit.client.count_tokens(messages) \
                if fit.client is not None and result.model == fit.model else None
            if fit.calibrate(result.model, messages, counted):
                messages = build()          # fitted again, to the server's own count
        except PromptTooLarge as exc:
            result.error, shown = f"{exc} ({exc.hint})", str(exc)
        else:       # commands that may not run here: nothing is sent, nothing runs
            refused = run.commands_refused() if _commands_of(step) else None
            if refused is None:
                return messages
            result.error = shown = refused
        result.status = "skipped" if step.on_failure == "skip" else "failed"
        self.say(f"  {step.label}: {result.status}: {shown}")
        return None

    def _attempts(self) -> None:
        """Send attempts until one passes or AttemptFailure.retries says stop, then
        escalate (escalation_target); settle the result."""
        run, step, result = self.run, self.step, self.result
        model, clock = result.model, time.monotonic()
        budget = self.runner.fit.budget(step, model)
        messages = self._first_prompt()
        if messages is None:
            return
        retry_note: list[dict] = []
        failures: list[tuple[str, str]] = []       # (output, why it failed), for an escalation
        for number in range(1, step.max_retries + 2):
            result.attempts = number
            self.say(f"  {step.label}: attempt {number}/{step.max_retries + 1}")
            self.say("\n".join(f"--- {m['role']} ---\n{m['content']}"
                               for m in messages + retry_note), detail=True)
            result.output = ""
            sampling = retry_sampling(run.config.retry_sampling, step, number)
            spent = result.usage["completion_tokens"]
            failure = self.send(Attempt(self, number, model, messages + retry_note, sampling))
            if result.attempt_log:
                result.attempt_log[-1].update(
                    completion_tokens=result.usage["completion_tokens"] - spent,
                    error=failure and failure.message)
            result.duration_s = time.monotonic() - clock
            if failure is None:
                result.status, result.error = "succeeded", None
                self.say(f"  {step.label}: succeeded in {result.duration_s:.1f} s")
                return
            result.error = failure.message
            failures.append((result.output, failure.message))
            self.say(f"  {step.label}: attempt {number} failed: {failure.message}")
            retrying = failure.retries(number, step)
            self._failed(number, failure, retrying)
            if not retrying:
                break
            retry_note = fit_feedback(messages, failure.feedback, budget)
        escalate_to, unused = escalation_target(run.config, run.plan)
        if unused:
            self.say(f"  {step.label}: {unused}")
        if escalate_to and not run.cancel.is_set():
            saved = self._escalate(escalate_to, escalation_messages(messages, failures))
            result.duration_s = time.monotonic() - clock
            if saved:
                return
        result.status = "skipped" if step.on_failure == "skip" else "failed"
        self.say(f"  {step.label}: {result.status} after {result.attempts} attempt(s)")
    def _failed(self, number: int, failure: "AttemptFailure", retrying: bool) -> None:
        """Emit the attempt_failed event (with --events)."""
        self.runner.events.emit("attempt_failed", self.run.plan.id, self.step.id,
                                attempt=number, error=failure.message, retrying=retrying)

    def _escalate(self, escalate_to: str, messages: list[dict]) -> bool:
        """Send one more attempt to escalate_to with messages (escalation_messages);
        return True when it passed."""
        step, result = self.step, self.result
        number = result.attempts + 1
        result.attempts, result.escalated_to, result.output = number, escalate_to, ""
        self.say(f"  {step.label}: escalating to {escalate_to} (attempt {number})")
        failure = self.send(Attempt(self, number, escalate_to, messages))
        result.escalation_saved = failure is None
        if failure is None:
            result.status, result.error = "succeeded", None
            self.say(f"  {step.label}: succeeded on {escalate_to}")
            return True
        result.error = f"{failure.message} (after escalating to {escalate_to})"
        self._failed(number, failure, False)
        self.say(f"  {step.label}: the escalation failed too: {failure.message}")
        return False

    def send(self, attempt: Attempt) -> "AttemptFailure | None":
        """Send one attempt, check it, write its file; return None or its AttemptFailure.

        A WATCHED executor's stream is watched (DegenerationGuard): a degenerate answer
        is cancelled and fails saying why; so does one cut at max_tokens, saying what
        thinking spent of it. On the run's model server it asks for thinking as
        thinking_asked says and keeps ContextFit.reserve tokens for it."""
        failure = self._prepare(attempt)
        if failure is not None:
            return failure
        try:
            reply = self._chat(attempt)
        except (LLMError, OutputDegenerate) as exc:
            return self._unanswered(attempt, exc)
        return self._answered(attempt, reply)

    def _prepare(self, attempt: Attempt) -> "AttemptFailure | None":
        """Fill in the attempt's executor, sampling, thinking and schema; record what it
        sends (attempt_log, transcript); return why it cannot be sent, or None."""
        run, step, result = self.run, self.step, self.result
        try:
            attempt.executor, attempt.name = self.runner.executor(attempt.model, run.cli_cwd)
        except LLMError as exc:          # no key, no claude binary, not allowed
            return AttemptFailure.final(str(exc))
        if executor_class(attempt.model).PAID and (refused := self.runner.spend.refused()):
            run.cap_hit = True
            return AttemptFailure.final(refused)
        local = attempt.local = attempt.executor.PROBED    # the others keep their own limits
        attempt.sampling = self._sampling(attempt)
        sent = attempt.executor.accepted_sampling(attempt.sampling) if local else attempt.sampling
        attempt.thinking = thinking_asked(step) if local else None
        attempt.reserve = self.runner.fit.reserve(step, attempt.model) if local else 0
        result.attempt_log.append({"attempt": attempt.number, "sampling": sent,
                                   "completion_tokens": 0, "error": None,
                                   "thinking": attempt.thinking,
                                   "thinking_reserve_tokens": attempt.reserve})
        run.runlog.sent(step.id, attempt.number, attempt.messages, sent)
        if attempt.reserve:
            self.say(f"  {step.label}: max_tokens {attempt.sampling['max_tokens']} keeps up to "
                     f"{attempt.reserve} for thinking (the step asks for it, or the model "
                     "thought earlier in this run)")
        sends = local and attempt.executor.structured_level < len(RESPONSE_FORMS) and \
            attempt.name not in attempt.executor.unconstrained
        attempt.schema = redact(self._output_schema(attempt.number, sends))  # spans copy the input
        return None

    def _chat(self, attempt: Attempt) -> Completion:
        """Send the attempt's request, again while the server cuts it for another
        (resend_on_contention). On slots sharing one context (ContextFit.pool) it first
        waits for its prompt (estimate_tokens) and max_tokens to fit beside those in flight."""
        fit, sampling, local = self.runner.fit, attempt.sampling, attempt.local
        watched = attempt.executor.WATCHED
        pool = fit.pool if local and attempt.model == fit.model and fit.parallel > 1 else None
        request = ChatRequest(attempt.name, sampling, sampling.get("max_tokens"),
                              self.step.timeout_s, attempt.schema, attempt.thinking,
                              attempt.on_delta, attempt.on_reasoning)
        need = estimate_tokens(attempt.messages) + int(request.max_tokens or 0)
        held = pool.acquire(need, self.run.cancel) if pool is not None else 0

        def send() -> Completion:
            attempt.guard = DegenerationGuard(checked_depth(self.step.validation)) \
                if watched else None
            attempt.thinking_guard = DegenerationGuard() if watched else None
            attempt.pieces = attempt.thought = 0
            return attempt.executor.chat(attempt.messages, request)
        try:
            return resend_on_contention(send, self.run.cancel, self.runner.contention)
        finally:
            if pool is not None:
                pool.release(held)

    def _unanswered(self, attempt: Attempt, exc: "LLMError | OutputDegenerate") -> AttemptFailure:
        """Record an attempt whose request failed or whose stream was stopped; return its
        AttemptFailure. LLMServerUnusable stops the run (halt, cancel); a context
        overflow teaches ContextFit the context when none is known."""
        run, fit = self.run, self.runner.fit
        self.result.generation_s += time.monotonic() - attempt.started
        attempt.thought_cut()
        if isinstance(exc, OutputDegenerate):
            return attempt.stopped(str(exc))
        run.runlog.checked(self.step.id, attempt.number, str(exc))
        if isinstance(exc, LLMServerUnusable):      # the server's failure, not the step's
            if run.halt is None:
                run.halt = exc
            run.cancel.set()
        elif exc.context_overflow and attempt.local and attempt.model == fit.model \
                and fit.context_length is None:
            fit.learn_context(str(exc))
        return AttemptFailure.from_request(exc)

    def _answered(self, attempt: Attempt, reply: Completion) -> "AttemptFailure | None":
        """Price and record a reply, learn from its usage; fail it when its prompt was
        cut or its answer stopped at max_tokens, else check it."""
        run, step, result, fit = self.run, self.step, self.result, self.runner.fit
        local, executor = attempt.local, attempt.executor
        result.generation_s += time.monotonic() - attempt.started
        pieces = attempt.pieces + attempt.thought
        reply = priced_reply(reply, attempt.messages, pieces, attempt.name)
        if local and fit.reprobe:
            fit.reprobe_loaded(attempt.model)
        if executor_class(attempt.model).PAID:
            self.runner.spend.add(reply.cost_usd or 0.0)
        if run.cancel.is_set():
            return AttemptFailure.final("interrupted")
        output, inline = split_reasoning(reply.text)
        run.runlog.answer(step.id, attempt.number, reply)
        if local:
            result.attempt_log[-1]["response_format"] = reply.response_format
        _add_usage(result, reply, attempt.messages, pieces, attempt.model)
        thought, answered = attempt.thought_of(reply, inline)
        cuts = local and executor.cuts_prompts
        if cuts and reply.usage:     # the steps after it fit better
            fit.calibrate(attempt.model, attempt.messages, reply.usage.get("prompt_tokens"))
        result.output = output
        cut = prompt_cut(reply.usage, attempt.messages) if cuts else None
        if cut:
            run.runlog.checked(step.id, attempt.number, cut)
            return AttemptFailure.final(cut)    # the same prompt would be cut again
        if reply.finish_reason in ("length", "max_tokens"):     # OpenAI's word, Anthropic's
            limit = attempt.sampling.get("max_tokens") or executor.DEFAULT_MAX_TOKENS \
                or "the server's limit"
            why = (f"stopped at max_tokens={limit}: the answer was cut before it ended "
                   "(raise the step's max_tokens if it needs more)")
            if thought:
                why = attempt.cut_thinking(limit, thought,
                                           max(1, answered) if output.strip() else 0)
            run.runlog.checked(step.id, attempt.number, why)
            return AttemptFailure.from_stop(why, step.validation)
        if reply.model and reply.model != attempt.name:
            result.model = reply.model
        self.say(f"--- output ---\n{output}", detail=True)
        failure = self._check(output, output)
        if failure is not None and failure.answer_invalid and local and reply.response_format:
            self._garbled(attempt, output, reply.response_format)
        return failure

    def _garbled(self, attempt: Attempt, output: str, form: str) -> None:
        """After a constrained answer failed: when grammar_damage finds it damaged by the
        schema sent, send that model's later requests unconstrained, and say so."""
        executor, name = attempt.executor, attempt.name
        if name in executor.unconstrained:
            return
        damage = grammar_damage(output, attempt.schema)
        if damage:
            executor.drop_constraint(name, damage)
            self.say(f"  {self.step.label}: the constrained answer ({form}) looks garbled "
                     f"by the grammar ({damage}); {name}'s answers go unconstrained for the "
                     "rest of this run, still checked")

    def _output_schema(self, number: int, sends: bool) -> dict | None:
        """Return the schema an attempt asks for (output_schema of the step's input); for a
        grounded step, record its form: "spans" (values copied from the input only),
        "schema" (more than GROUNDED_MAX_SPANS spans, or a json validation) or "none"
        (sends False: no schema is sent, only the check applies)."""
        step = self.step
        schema = output_schema(step.validation, self.run.sources.get(step.id, []))
        first = next((v for v in validations_of(step.validation)
                      if output_schema(v) is not None), {})
        if first.get("grounded") and schema is not None:
            spans = (schema.get("$defs") or {}).get("bridge_span") if sends else None
            form = "none" if not sends else "spans" if spans else "schema"
            self.run.runlog.constrained(step.id, number, form,
                                        len(spans["enum"]) if spans else None)
        return schema

    def _sampling(self, attempt: Attempt) -> dict:
        """Return the attempt's sampling fields with its max_tokens: its own on a local
        model (retry_sampling), else the step's."""
        step, local = self.step, attempt.local
        sampling = dict(retry_sampling("plain", step, 1) if attempt.sampling is None or not local
                        else attempt.sampling)
        limit = self.runner.fit.max_tokens(step, attempt.model, attempt.messages) if local \
            else step.max_tokens
        if limit:
            sampling["max_tokens"] = limit
        return sampling

    def _check(self, output: str, answer: str) -> "AttemptFailure | None":
        """Check an output, write its file, run the step's commands up to the first that
        fails; return None or the AttemptFailure. A failed command puts the file back at
        once, and so does anything that stops the run while a command runs."""
        run, step, result = self.run, self.step, self.result
        files, number = run.files, result.attempts
        try:
            source = "\n".join(run.sources.get(step.id, []))
            artifact = check_output(output, step.validation, source)
        except OutputInvalid as exc:
            run.runlog.checked(step.id, number, str(exc))
            return AttemptFailure.from_output(str(exc), answer, step.validation)
        result.output = artifact
        if step.file_output:
            try:
                change = files.write(step.file_output, artifact,  # type: ignore[union-attr]
                                     step.id)
            except PathError as exc:
                run.runlog.checked(step.id, number, str(exc))
                return AttemptFailure.final(str(exc))
            done, review = ("staged", " for review") if run.staged else ("wrote", "")
            self.say(f"  {step.label}: {done} {step.file_output} ({change.action}){review}")
        try:
            failure = self._run_commands(answer)
        except BaseException:
            with _suppress(PathError):
                self._put_back()
            raise
        if failure is not None:
            try:
                self._put_back()
            except PathError as exc:
                return AttemptFailure.final(f"{failure.message}; and {exc}")
            return failure
        run.runlog.checked(step.id, number, None)
        if step.file_output:
            run.kept[step.file_output] = artifact
            if not run.staged:     # only a write that stays is what the run left
                record_written(run.run_dir, step.file_output, artifact.encode("utf-8"), step.id)
        return None

    def _run_commands(self, answer: str) -> "AttemptFailure | None":
        """Run the step's command validations in the project; return the first failure
        (its output goes into the next prompt), or None."""
        run, step, result = self.run, self.step, self.result
        number = result.attempts
        for validation in _commands_of(step):
            argv = validation["run"]
            self.say(f"  {step.label}: checking with `{shell_words(argv)}`")
            limit = validation.get("timeout_s", COMMAND_DEFAULT_TIMEOUT_S)
            command = run_command(argv, run.plan.project,  # type: ignore[arg-type]
                                  command_env(run.config), limit, run.cancel)
            result.checks.append({"attempt": number, **command.as_dict()})
            run.runlog.command(step.id, number, command)
            if command.error is None:
                self.say(f"  {step.label}: check passed in {command.duration_s:.1f} s")
                continue
            self.say(f"--- output of `{shell_words(argv)}` ---\n{command.output_tail}",
                     detail=True)
            run.runlog.checked(step.id, number, command.error)
            if run.cancel.is_set():
                return AttemptFailure.final("interrupted")
            return AttemptFailure.from_command(command, answer, step.file_output, step.validation)
        return None

    def _put_back(self) -> None:
        """Undo a failed attempt's file: what an earlier step of this run wrote there,
        else the original. Raises PathError (RollbackError) when it cannot."""
        step, files = self.step, self.run.files
        if not step.file_output or files is None:
            return
        if step.file_output in self.run.kept:
            files.write(step.file_output, self.run.kept[step.file_output], step.id)
        else:
            files.revert_path(step.file_output)


###############################################################################
# 37. A plan run: the checked plan, take-over and files
# What the gate hands a plan run (its checked plan and trust), which killed run
# it takes over, and what it does with the project's files beyond a step's
# write: put back what that run left, settle them as the plan asks, keep backups.
###############################################################################


def runnable_plan(record: PlanRecord, config: Config) -> Plan:
    """Return a stored plan as a run runs it: whole (not split into chunks by the memory
    server) and valid (check_plan). Raises PlanInvalid with the problems otherwise."""
    if record.chunks:
        raise PlanInvalid(record.plan_id, [SPLIT_PLAN_PROBLEM.format(chunks=record.chunks)])
    return check_plan(record.plan, Guard.of(config))


def narrowed_plan(plan: Plan, config: Config) -> Plan:
    """Return plan with each step's max_retries cut to --max-retries where it asks more:
    a plan only narrows the user's limits (timeout_s is narrowed where it is used: see
    HTTPExecutor and ClaudeCLI)."""
    steps = {sid: step._replace(max_retries=narrowed(step.max_retries, config.max_retries))
             for sid, step in plan.steps.items()}
    return plan._replace(steps=steps)


class CheckedPlan(namedtuple("CheckedPlan", "record plan problems trusted")):
    """A stored plan as the gate checked it, handed to its run (check_plan and the trust
    decision run once per run): record (PlanRecord), plan (runnable_plan, None when
    invalid), problems ([] when valid), trusted (plan_trusted: may it run commands)."""

    __slots__ = ()


def taken_over_run(runs_dir: Path, record: PlanRecord) -> tuple[str | None, str | None]:
    """Return (the run id of the killed run a stale plan's run takes over, or None; why
    not, or None). Taken over only when the run id read back from the store is one bridge
    made, and its folder is this plan's (nothing read back is a path)."""
    previous = record.state.get("run_id") if record.display_status == "stale" else None
    if previous is None:
        return None, None
    try:
        run_folder(runs_dir, previous)
    except PathError as exc:
        return None, f"plan {record.plan_id}: not taking over its last run: {exc}"
    if foreign := foreign_run_reason(runs_dir, previous, record):
        return None, f"plan {record.plan_id}: not taking over its last run: {foreign}"
    return previous, None


def _stop_running(results: dict[int, StepResult], why: str, error: str | None = None) -> None:
    """Mark the steps of a run that stopped early: running ones failed (error, else why),
    unrun ones say why."""
    for result in results.values():
        if result.status == "running":
            result.status, result.error = "failed", error or why
        elif result.attempts == 0 and result.error is None:
            result.error = f"not run: {why}"


class PlanRunFiles:
    """The files side of a PlanRun, which inherits it (its fields are PlanRun's)."""

    __slots__ = ()

    def _take_over(self) -> None:
        """Take over what a killed run (previous) left, and put back what it left half done.

        With keep_finished (--resume), its succeeded steps (steps.jsonl) keep their
        outputs and files, unless it had reverted its files; files written by any other
        step are restored from its journal. Raises RollbackError when one cannot be."""
        plan, previous, results, files = self.plan, self.previous, self.results, self.files
        old_dir = run_folder(self.config.runs_dir, previous)
        keep_finished = self.keep_finished
        if keep_finished and (old_dir / STAGED_FILE).exists():
            # a --review run (or its --apply) died: its outputs never all reached the project
            keep_finished = False
            self.progress.info(f"plan {plan.id}: run {previous} staged its files for review; "
                               "starting its steps over")
        try:
            reverted = any(e.get("reverted") for e in read_jsonl(old_dir / JOURNAL_FILE))
            done = {e["id"]: e for e in read_jsonl(old_dir / STEPS_FILE)
                    if keep_finished and not reverted
                    and e.get("status") == "succeeded" and e.get("id") in plan.steps}
            written = read_jsonl(old_dir / WRITTEN_FILE)
        except OSError as exc:      # a symlink where its records should be: not bridge's
            self.progress.error(f"plan {plan.id}: the records of run {previous} cannot be read "
                                f"({exc.strerror or exc}); every step runs again")
            done, written = {}, []
        for sid, entry in done.items():
            results[sid] = StepResult.from_checkpoint(entry, plan.steps[sid].title)
            append_jsonl(self.run_dir / STEPS_FILE, results[sid].checkpoint())
            if plan.steps[sid].file_output:
                self.kept[plan.steps[sid].file_output] = results[sid].output
        for entry in written:                   # what the kept steps wrote, for --undo
            if entry.get("step") in done:
                append_jsonl(self.run_dir / WRITTEN_FILE, entry)
        restored = files.recover(old_dir, set(done)) if files else []
        self.progress.info(f"plan {plan.id}: taking over run {previous}: {len(done)} step(s) "
                           f"already succeeded, {len(restored)} file(s) put back")
        for reason in getattr(files, "refused", []):
            self.progress.error(f"plan {plan.id}: {reason}")

    def _halted(self) -> None:
        """Leave a run the model server stopped (halt) as a user can take it up, and
        raise LLMServerUnusable saying so; no result is stored. A run that did nothing
        (no step succeeded, no file written, no run taken over) goes back to pending; else
        the plan stays in_progress (stale once this process exits) for --resume."""
        plan_id, files = self.record.plan_id, self.files
        if files is not None:
            files.close()
            if isinstance(files, FileTransaction):
                files._release()
        done = any(r.status == "succeeded" for r in self.results.values())
        if not done and not self.previous and not (files is not None and files.changes) \
                and self.runner.store.release(self.record, self.run_id):
            where = f"plan {plan_id} stays pending"
        else:
            where = f"plan {plan_id} is left to resume: bridge --plan {plan_id} --resume"
        raise LLMServerUnusable(f"{self.halt}; the run stops ({where})", self.halt.hint,
                                self.halt.status)

    def _settle_files(self, status: str) -> str | None:
        """Revert or keep the run's files as the plan asks; return an error or None.
        Kept files keep their backups at least until the result is stored."""
        plan, files = self.plan, self.files
        if files is None or not files.changes:
            return None
        if self.staged:
            if status == "failed":
                files.discard()         # nothing reached the project; nothing to review
            return None
        try:
            if status == "failed" and plan.rollback_strategy == "revert_files":
                files.rollback()
                self.progress.info(f"plan {plan.id}: reverted {len(files.changes)} file(s)")
            else:
                self._keep_backups()
                kept = ", ".join(path for path, change in files.changes.items()
                                 if change.action != "reverted")
                if status == "failed" and kept:
                    self.progress.info(f"plan {plan.id}: kept the files it wrote: {kept}")
        except RollbackError as exc:
            self.progress.error(str(exc))
            return str(exc)
        return None

    def _keep_backups(self) -> None:
        """Keep the run's backups for --undo (0600), then delete those of the plan's runs
        older than the last keep_runs (with 0, _close deletes them once the result is stored)."""
        config, plan_id = self.config, self.plan.id
        if config.keep_runs == 0:
            return
        for run_dir in plan_runs(config.runs_dir, plan_id):   # this one, and those it took over
            keep_backups(run_dir)
        pruned = prune_backups(config.runs_dir, plan_id, config.keep_runs)
        if pruned:
            self.progress.detail(f"plan {plan_id}: removed the backups of {len(pruned)} older "
                                 f"run(s) (keeping {config.keep_runs}): {', '.join(pruned)}")


###############################################################################
# 38. A plan run: its procedure
# One plan from its claim to its stored result: open, take over, run the steps,
# verify, settle the files, keep backups, store the result and the final state.
###############################################################################


class PlanRun(PlanRunFiles):
    """One run of one plan, from claim to result (as CPython's venv passes a `context`).
    plan: narrowed_plan of the checked plan (None: invalid); problems, trusted: the
    gate's; started (UTC ISO) and clock (time.monotonic()) at the claim; previous: the
    killed run it takes over; keep_finished: --resume; refused: why it does not take one
    over; files: FileTransaction, StagedFiles, or None without a project; results: step
    id -> StepResult; cancel: set when the run stops early; cli_cwd: where claude runs (a
    trusted project, else None: a scratch folder); kept: path -> what a succeeded step
    wrote there; positions: step id -> its place in the start order; cap_hit:
    --max-cost-usd was reached; sources: step id -> its input as sent (what a grounded
    answer copies); halt: the LLMServerUnusable that stopped the run, or None."""

    __slots__ = ("runner", "config", "progress", "record", "plan", "problems", "trusted",
                 "run_id", "run_dir", "started", "clock", "previous", "keep_finished", "refused",
                 "files", "results", "runlog", "log", "cancel", "cli_cwd", "kept", "positions",
                 "cap_hit", "sources", "halt")

    def __init__(self, runner: "Runner", checked: CheckedPlan, run_id: str,
                 previous: str | None, keep_finished: bool):
        self.runner, self.config, self.progress = runner, runner.config, runner.progress
        self.record, self.problems, self.trusted = checked.record, checked.problems, checked.trusted
        self.plan = narrowed_plan(checked.plan, self.config) if checked.plan else None
        self.run_id, self.run_dir = run_id, self.config.runs_dir / run_id
        self.started, self.clock = utc_now_iso(), time.monotonic()
        self.previous, self.keep_finished, self.refused = previous, keep_finished, None
        self.files: FileTransaction | StagedFiles | None = None
        self.results: dict[int, StepResult] = {}
        self.runlog: RunLog | None = None
        self.log: _StepLog | None = None
        self.cancel = threading.Event()
        self.cli_cwd = None
        self.kept: dict[str, str] = {}
        self.positions: dict[int, int] = {}
        self.cap_hit = False
        self.sources: dict[int, list[str]] = {}
        self.halt: LLMServerUnusable | None = None

    def run(self, problems: list[str]) -> dict:
        """Run the plan and store its result; return the stored result document.

        problems: reasons found outside the plan (an id shared with another live plan);
        with any, or the gate's, the plan is recorded failed and nothing is sent.
        Re-raises KeyboardInterrupt once the plan is recorded failed. Raises
        LLMServerUnusable (_halted), ResultNotStored or StoreError."""
        self._announce()
        problems = [*problems, *self.problems]
        if problems:
            return self._invalid(problems)
        with _Heartbeat(self.config, self.record, self.run_id):
            self._open()                        # logs, trust, files, step results
            error, verify, interrupted = self._work()   # records, take over, steps, verify
            if self.halt is not None and interrupted is None:
                self._halted()                  # raises: the plan stays pending or resumable
            with shielded_signals(self.progress.error, for_good=interrupted is not None):
                result = self._close(error, verify, interrupted)    # files, backups, result
        if interrupted:
            raise interrupted
        return result

    @property
    def staged(self) -> bool:
        """True when the run stages its files for review (--review) instead of writing them."""
        return isinstance(self.files, StagedFiles)

    def where(self, step: Step) -> str:
        """Return "plan ID · step N/M" for a progress line of a step that started."""
        return (f"plan {self.plan.id} · step {self.positions.get(step.id, 0)}"
                f"/{len(self.plan.steps)}")

    def _announce(self) -> None:
        record = self.record
        self.runner.events.emit("plan_start", record.plan_id, run_id=self.run_id,
                                objective=record.objective, steps=record.step_count,
                                model=self.runner.model)
        if self.refused:
            self.progress.error(self.refused)

    def _invalid(self, problems: list[str]) -> dict:
        """Record the plan failed with every problem, nothing sent; return the result."""
        self.progress.error(f"plan {self.record.plan_id}: invalid: {problems_line(problems)}")
        result = self._result("failed", f"plan is invalid ({len(problems)} problem(s))")
        result["problems"] = problems
        if self.refused:
            result["refused"] = [self.refused]
        return self._finish(result)

    def _open(self) -> None:
        """Fill in what a checked plan's run needs: its logs, files and step results."""
        plan, config = self.plan, self.config
        self.progress.info(f"plan {plan.id}: {plan.objective or '(no objective)'} "
                           f"· {len(plan.steps)} step(s) · model {self.runner.model}")
        self.runlog = RunLog(self.run_dir, self.run_id, plan.id, config.price_model)
        if plan.project is not None and trusted_root(config, plan.project) is not None:
            self.cli_cwd = plan.project
        if not plan.project:
            self.files = None
        elif config.review:
            self.files = StagedFiles(plan.project, self.run_dir, config.crash_at)
        else:
            self.files = FileTransaction(plan.project, self.run_dir, config.crash_at,
                                         Guard.of(config))
        self.results = {sid: StepResult(sid, step.title) for sid, step in plan.steps.items()}

    def _work(self) -> tuple[str | None, dict | None, BaseException | None]:
        """Write the run's records, take over a killed run, run the steps and verify;
        return (the plan's error, the verify record, the interrupt that stopped it), each
        or None."""
        plan, results = self.plan, self.results
        try:
            private_dir(self.run_dir, tighten=True)     # its backups hold the project's files
            write_run_info(self.run_dir, plan.id, plan.project, self.started,
                           self.record.content_hash)
            if self.staged:
                self.files.note_reads(plan.files_context)
            if self.previous:
                self._take_over()
            return (*self._run_and_verify(), None)
        except KeyboardInterrupt as exc:
            current = sorted(r.id for r in results.values() if r.status == "running")
            _stop_running(results, "the run was interrupted", "interrupted")
            where = f" at step {', '.join(map(str, current))}" if current else ""
            return f"interrupted{where}", None, exc
        except RollbackError as exc:        # files of a killed run could not be put back
            return str(exc), None, None
        except OSError as exc:              # a full disk or read-only state dir: the run's records
            _stop_running(results, "the run's records could not be written")
            return (f"cannot write the run's records in {self.run_dir}: {exc.strerror or exc} "
                    "(free some space, or make --state-dir writable)"), None, None

    def _run_and_verify(self) -> tuple[str | None, dict | None]:
        """Run the steps, then the plan's verify; return (the plan's error, the verify
        record), each or None. A verify that may not run here fails the plan before any
        step is sent: no model time is spent on a plan that cannot pass."""
        plan = self.plan
        if plan.verify is not None and (message := self.commands_refused()):
            for result in self.results.values():
                result.error = result.error or "not run: the plan's verify cannot run"
            self.progress.error(f"plan {plan.id}: verify: {message}")
            return f"verify: {message}", {"argv": list(plan.verify["run"]), "ran": False,
                                          "error": message}
        error = self._run_steps()
        if error is not None or plan.verify is None:
            return error, None
        argv = plan.verify["run"]
        self.progress.info(f"plan {plan.id}: verifying with `{shell_words(argv)}`")
        limit = plan.verify.get("timeout_s", COMMAND_DEFAULT_TIMEOUT_S)
        command = run_command(argv, plan.project,  # type: ignore[arg-type]  # check_plan
                              command_env(self.config), limit, self.cancel)
        append_jsonl(self.run_dir / VERIFY_FILE, command.as_dict(), sync=False)
        record = {"ran": True, **command.as_dict()}
        if command.error is None:
            self.progress.info(f"plan {plan.id}: verify passed in {command.duration_s:.1f} s")
            return None, record
        self.progress.error(f"plan {plan.id}: verify failed: {command.error}")
        self.progress.detail(command.output_tail)
        return f"verify failed: {command.error}", record

    def commands_refused(self) -> str | None:
        """Return why this run may not run the plan's commands, or None when it may."""
        if not self.trusted:
            return untrusted_message(self.plan)
        if self.staged:
            return ("a command checks the file in the project, and --review stages files "
                    "outside it; run the plan without --review to check it with its command")
        return None

    def _run_steps(self) -> str | None:
        """Run every step through a StepScheduler; return the plan's error or None.
        Each finished step is appended to steps.jsonl, so a killed run can be resumed;
        when the run stops early, steps still running may no longer write files."""
        plan, checkpoint = self.plan, self.run_dir / STEPS_FILE
        graph, parallel = step_graph(plan), self.runner.fit.parallel
        self.log = _StepLog(self.progress, sequential_order(graph), immediate=parallel == 1)
        scheduler = StepScheduler(graph, parallel, self)
        private_dir(checkpoint.parent)
        with _suppress(OSError):            # a runs folder made before bridge kept it private
            private_dir(checkpoint.parent.parent, tighten=True)
        # Flushed, not fsynced: a killed process loses nothing from the page cache, and a
        # line lost to a power cut only means that step runs again on --resume (its
        # file writes are journaled and fsynced, so recovery puts them back first).
        with open(checkpoint, "a", encoding="utf-8", opener=private_opener) as journal:
            try:
                return scheduler.run(lambda result: _write_line(journal, result.checkpoint()))
            except BaseException:
                if self.files is not None:
                    self.files.close()
                raise

    def run_step(self, step: Step, result: StepResult, outputs: dict[int, str],
                 position: int) -> None:
        """Run one step (StepRun), filling result."""
        StepRun(self, step, outputs).run_step(position)

    def step_ended(self, result: StepResult) -> None:
        """Emit a step_end event for a step that is over (with --events)."""
        events = self.runner.events
        if not events.enabled:
            return
        entry = result.as_dict(self.config.price_model)
        events.emit("step_end", self.plan.id, result.id,
                    **{k: v for k, v in entry.items() if k != "id"})

    def _close(self, error: str | None, verify: dict | None,
               interrupted: BaseException | None) -> dict:
        """Settle the run's files, then store its result (see _finish); return it."""
        files = self.files
        status = "failed" if error else "completed"
        file_error = self._settle_files(status)
        if file_error:
            error = f"{error}; {file_error}" if error else file_error
            status = "failed"
        if status == "completed" and self.staged and files.changes:
            status = "awaiting_review"          # nothing is in the project until --apply
        result = self._result(status, error)
        if self.previous:
            result["resumed_from"] = self.previous
        if verify is not None:
            result["verify"] = verify
        refusals = ([self.refused] if self.refused else []) + getattr(files, "refused", [])
        if refusals:
            result["refused"] = refusals
        try:
            result = self._finish(result)
        except ResultNotStored as exc:
            if interrupted is None:
                raise
            self.progress.error(str(exc))       # the interrupt still ends the run (exit 130)
            raise interrupted from exc
        finally:
            if isinstance(files, FileTransaction):
                files._release()        # the project folder's descriptor
        if files is not None and self.config.keep_runs == 0 and not self.staged:
            files.discard()         # only now: a result that cannot be stored keeps the backups
        return result

    def _result(self, status: str, error: str | None) -> dict:
        """Build the run's result document (README: "What bridge writes into the store")."""
        steps = [self.results[sid] for sid in sorted(self.results)]
        usage = {"prompt_tokens": sum(s.usage["prompt_tokens"] for s in steps),
                 "completion_tokens": sum(s.usage["completion_tokens"] for s in steps)}
        counts = {k: sum(1 for s in steps if s.status == k)
                  for k in ("succeeded", "failed", "skipped")}
        generation_s = sum(s.generation_s for s in steps)
        config, record, price = self.config, self.record, self.config.price_model
        if self.cap_hit and error:
            error += f"; spend cap reached (--max-cost-usd {config.max_cost_usd:.2f})"
        speed = round(usage["completion_tokens"] / generation_s, 1) if generation_s else None
        return {"type": "bridge_result", "plan_id": record.plan_id, "run_id": self.run_id,
                "objective": record.objective, "status": status,
                "project": project_name(self.plan.project)
                if self.plan and self.plan.project else None,
                "success": status in ("completed", "awaiting_review"),
                "started_at": self.started, "finished_at": utc_now_iso(),
                "duration_s": round(time.monotonic() - self.clock, 3), "model": self.runner.model,
                "base_url": config.base_url, "usage": usage, "tokens_per_s": speed,
                "cost_usd": round(sum(s.cost_usd for s in steps), 6),
                "would_have_cost_usd": would_cost_usd(usage, price), "price_model": price,
                "ledger": merge_ledgers(s.ledger for s in steps),
                "escalations": [{"step": s.id, "model": s.escalated_to,
                                 "saved": s.escalation_saved} for s in steps if s.escalated_to],
                "max_cost_usd": config.max_cost_usd, "spend_cap_reached": self.cap_hit,
                "savings": run_savings(steps, price),
                "counts": counts, "steps": [s.as_dict(price) for s in steps],
                "files": self.files.summary() if self.files else [], "error": error,
                "run_log": str(config.runs_dir / self.run_id),
                "output_max_chars": STORED_OUTPUT_MAX_CHARS, "bridge_version": __version__}

    def _finish(self, result: dict) -> dict:
        """Store the result and the plan's final state, then print its summary; return
        shown_result of it. Raises ResultNotStored when the store cannot be written: the
        plan stays in_progress (stale once this process is gone) for --resume or --rerun."""
        record, runner, progress = self.record, self.runner, self.progress
        try:
            digest = runner.store.finish(record, result_memory(result), runner.memory_api,
                                         progress.warning)
        except StoreError as exc:
            raise ResultNotStored(
                f"plan {record.plan_id}: its result was not stored: {exc}; the plan stays in "
                "progress (stale once this bridge exits), its files and their backups kept",
                f"when the store is free: bridge --plan {record.plan_id} --resume (keeps its "
                "succeeded steps) or --rerun (puts its files back, starts over)") from exc
        result = shown_result(result, digest, {}, self.config.runs_dir)  # as --show --json does
        counts = result["counts"]
        tokens = result["usage"]["prompt_tokens"] + result["usage"]["completion_tokens"]
        line = (f"plan {result['plan_id']}: {result['status']} · {counts['succeeded']} succeeded, "
                f"{counts['failed']} failed, {counts['skipped']} skipped · {tokens} tokens · "
                f"{result['duration_s']:.1f} s · "
                + ("$0 here" if not result["cost_usd"] else f"${result['cost_usd']:.4f} spent")
                + f", ${result['would_have_cost_usd']:.4f} on {result['price_model']}")
        if result["error"]:
            line += f" · {result['error']}"
        (progress.info if result["success"] else progress.error)(line)
        for change in result["files"]:
            staged = " (staged, not written)" if change.get("staged") else ""
            progress.info(f"  file {change['path']}: {change['action']}{staged}")
        if result["status"] == "awaiting_review":
            plan_id = result["plan_id"]
            progress.info(f"  staged for review, nothing written: bridge --diff {plan_id}, then "
                          f"bridge --apply {plan_id} or bridge --reject {plan_id}")
        progress.info("  " + savings_line(result["savings"]))
        if len(result["ledger"]) > 1 or result["escalations"]:
            for text in ledger_lines(result):
                progress.info(text)
        runner.events.emit("plan_end", result["plan_id"], **{key: result.get(key) for key in (
            "run_id", "status", "success", "usage", "duration_s", "cost_usd",
            "would_have_cost_usd", "result_hash", "error", "problems", "run_log")})
        return result


###############################################################################
# 39. Runner
# What outlives one plan: the store, the executors, the spend cap, the events,
# the model's context; each plan it claims runs as a PlanRun.
###############################################################################


class SpendCap:
    """What paid requests have cost in this process (US dollars), against --max-cost-usd;
    thread-safe."""

    def __init__(self, max_cost_usd: float):
        self.max_cost_usd, self.spent_usd = max_cost_usd, 0.0
        self._lock = threading.Lock()

    def add(self, cost_usd: float) -> None:
        """Count one paid reply's cost (US dollars)."""
        with self._lock:
            self.spent_usd += max(0.0, cost_usd)     # never below what was spent (priced_reply)

    def refused(self) -> str | None:
        """Return why no more paid requests may be sent (the cap is reached), or None."""
        with self._lock:
            spent = self.spent_usd
        if spent < self.max_cost_usd:
            return None
        return (f"spend cap reached: this run spent ${spent:.4f} of --max-cost-usd "
                f"${self.max_cost_usd:.2f}; no more paid requests (raise --max-cost-usd)")


class Runner:
    """Runs plans from one store, each step on the executor its model reference names.

    client: an open LLMClient, or None when no plan will be sent (then only invalid plans
    can be recorded). model: the default model id. It keeps what outlives a plan: the
    executors, spend (SpendCap), events, fit (ContextFit); each plan runs as a PlanRun."""

    def __init__(self, config: Config, store: Store, client: "LLMClient | None",
                 model: str | None, progress: Progress):
        self.config, self.store, self.client = config, store, client
        self.model, self.progress = model, progress
        self.events = Events(config.events, deltas=config.deltas)
        self.fit = ContextFit(config, client, model, progress)
        self.spend = SpendCap(config.max_cost_usd)   # paid requests of this process
        self.memory_api = MemoryAPI(config.memory_url, config.memory_api_key) \
            if config.memory_url else None
        self._executors: dict[tuple, Any] = {}
        self._contention_said = False       # a cut stream (LLMContention) was said once

    def executor(self, ref: str, cli_cwd: Path | None = None) -> tuple[Any, str]:
        """Return (executor, model name) for a model reference (parse_model_ref): the
        run's client for a PROBED kind, else one opened once (an AGENTIC one per cli_cwd).
        Raises LLMError when it cannot be used (not allowed, no key, no binary)."""
        kind, name = _executor_of(ref), parse_model_ref(ref)[1]
        cls = EXECUTORS[kind]
        if cls.needs_allowing() and kind not in self.config.allowed_executors:
            raise LLMError(*cls.refusal(ref, name))
        if cls.PROBED:
            assert self.client is not None, "a plan with steps needs a model client"
            return self.client, name
        key = (kind, cli_cwd) if cls.AGENTIC else (kind,)
        if key not in self._executors:
            self._executors[key] = cls.for_run(self.config, cli_cwd, self.report_retry)
        return self._executors[key], name

    def report_retry(self, message: str) -> None:
        """Tell the user a request is being retried (every executor reports here)."""
        self.progress.retrying(message)

    def contention(self, exc: LLMContention) -> None:
        """Say, once a process, that a stream was cut for another request and is resent."""
        if not self._contention_said:
            self._contention_said = True
            self.progress.retrying(f"{exc}; sending it again after a wait, as long as "
                                   f"that goes on (hint: {exc.hint})")

    def close(self) -> None:
        """Close the executors this runner opened."""
        for executor in self._executors.values():
            executor.close()

    def run_record(self, checked: CheckedPlan, allowed: tuple[str, ...] = ("pending",),
                   problems: list[str] | None = None, resume: bool = False) -> dict | None:
        """Claim a plan the gate checked and run it (PlanRun.run); return its stored result
        document, or None when another process claimed it first. allowed: the statuses it
        may claim; problems: as PlanRun.run takes; resume: keep the steps a killed run
        finished. Raises what PlanRun.run raises, and StoreError."""
        record, run_id = checked.record, new_run_id()
        previous, refused = taken_over_run(self.config.runs_dir, record)
        if not self.store.claim(record, run_id, allowed, resumed_from=previous):
            self.progress.info(f"plan {record.plan_id}: taken by another bridge process; skipped")
            return None
        run = PlanRun(self, checked, run_id, previous, resume)
        run.refused = refused
        return run.run(list(problems or []))


###############################################################################
# 40. CLI: arguments and settings
###############################################################################


def _setting_help(row: Setting) -> str:
    """The --help text of a row of SETTINGS: its help (its choices where the row names
    them: "{choices}"), its variable and its default."""
    if "{choices}" in row.help:
        row = row._replace(help=row.help.format(choices=", ".join(row.limit())))
    if row.kind == "switch":
        return f"{row.help} (env {row.env}=0; default: {row.shown})"
    env = f"{row.env}, comma-separated" if isinstance(row.default, tuple) else row.env
    shown = row.shown
    if shown is None:
        shown = f"{row.default:g}" if isinstance(row.default, float) else row.default
    return f"{row.help} (env {env}; default {shown})"


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's own help layout, given the terminal width (see terminal_columns)."""

    def __init__(self, prog: str):
        super().__init__(prog, width=terminal_columns() - 2)   # argparse's own margin


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are one line, as every error of bridge is."""

    def error(self, message: str) -> None:   # argparse's hook: print and exit 2
        """Print "bridge: error: MESSAGE; see bridge --help" on stderr and exit 2."""
        line = printable(f"{self.prog}: error: {message}; see {self.prog} --help")
        self.exit(EXIT_UNUSABLE, line + "\n")


def add_settings(parser: argparse.ArgumentParser) -> None:
    """Add the settings group to parser: an option per row of SETTINGS, in its order.

    A switch is a store_true flag turning its default off; a tuple default makes the flag
    repeatable (append); a tuple limit (or a function giving one, read now) is the flag's
    argparse choices.
    """
    group = parser.add_argument_group("settings (a flag wins over its environment variable)")
    for row in SETTINGS:
        options: dict[str, Any] = {"help": _setting_help(row)}
        if row.kind == "switch":
            options.update(action="store_true", default=None)
        else:
            options["metavar"] = row.metavar
        limit = row.limit() if callable(row.limit) else row.limit    # the executors: registered
        if isinstance(limit, tuple):
            options["choices"] = limit
        if isinstance(row.default, tuple):
            options["action"] = "append"
        group.add_argument(row.flag, **options)


def _first(flag: Any, env: str | None) -> Any:
    """The flag's value, else the variable's (an empty one counts as unset), else None."""
    return flag if flag is not None else (env or None)


def _dest(flag: str) -> str:
    """argparse's attribute for a long flag: --max-retries is args.max_retries."""
    return flag[2:].replace("-", "_")


def _number(row: Setting, raw: str | None, kind: type = float) -> Any:
    """Return raw as a kind (int or float) of at least row.limit, row.default when raw is
    None. Raises ConfigError naming the setting, the value and where it is set."""
    if raw is None:
        return row.default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or value < row.limit or value != value:
        whole = "whole " if kind is int else ""
        raise ConfigError(f"{row.what} must be a {whole}number ≥ {row.limit:g}, got {raw!r}",
                          f"fix {row.flag} or {row.env}")
    return value


def _one_of(row: Setting, name: str | None) -> str:
    """Return name when it is one of row.limit, row.default when it is None; raise
    ConfigError naming what was asked and where it is set."""
    if name is None:
        return row.default
    if name not in row.limit:
        raise ConfigError(f"unknown {row.what} {name!r}",
                          f"pick one of {', '.join(row.limit)} ({row.flag} or {row.env})")
    return name


def _names(flag: list[str] | None, env: str | None) -> tuple[str, ...]:
    """The names of a repeated flag and of its comma-separated variable, both, once each."""
    names = [*(flag or []), *(env or "").split(",")]
    return tuple(dict.fromkeys(n.strip() for n in names if n.strip()))


def _switch(flag: bool | None, env: str | None) -> bool:
    """False when the switch's flag is given or its variable is 0, false, no or off."""
    return not flag and (env or "1").strip().lower() not in ("0", "false", "no", "off")


# How resolve_config reads a row of SETTINGS of each kind: (row, flag value, variable value)
_READERS = {
    "text": lambda row, flag, env: _first(flag, env),
    "url": lambda row, flag, env: (_first(flag, env) or row.default).rstrip("/"),
    "number": lambda row, flag, env: _number(row, _first(flag, env)),
    "count": lambda row, flag, env: _number(row, _first(flag, env), int),
    "choice": lambda row, flag, env: _one_of(row, _first(flag, env)),
    "names": lambda row, flag, env: _names(flag, env),
    "switch": lambda row, flag, env: _switch(flag, env),
}


def _trusted_projects(config_dir: Path, environ: dict[str, str]) -> tuple[Path, ...]:
    """The user's trusted folders as real paths: the trust file's, then
    BRIDGE_TRUSTED_PROJECTS's (os.pathsep-separated)."""
    path = Path(config_dir, TRUST_FILENAME)
    listed = read_config_file(path, "trusted_projects", list)
    from_env = [p for p in environ.get("BRIDGE_TRUSTED_PROJECTS", "").split(os.pathsep)
                if p.strip()]
    for where, entries in ((str(path), listed), ("BRIDGE_TRUSTED_PROJECTS", from_env)):
        for entry in entries:
            if isinstance(entry, str) and not os.path.isabs(os.path.expanduser(entry)):
                raise ConfigError(f"{where} names the relative folder {entry!r}: trust would "
                                  "follow whatever folder bridge starts in",
                                  "give the project's absolute path")
    return tuple(dict.fromkeys(real_path(p) for p in [*listed, *from_env] if isinstance(p, str)))


def _allowed_executors(args: argparse.Namespace, environ: dict[str, str]) -> tuple[str, ...]:
    """openai, plus what the user allowed: --allow-executor, BRIDGE_ALLOW_EXECUTORS
    (comma- or os.pathsep-separated), and the executors of their own --model and
    --escalate-to (or their variables). Raises ConfigError for an unknown name."""
    names = list(args.allow_executor or [])
    names += re.split(f"[,{re.escape(os.pathsep)}]", environ.get("BRIDGE_ALLOW_EXECUTORS", ""))
    names = [n.strip() for n in names if n.strip()]
    for name in names:
        if name not in allowable_executors():
            raise ConfigError(f"unknown executor {name!r} to allow",
                              f"pass one of {', '.join(allowable_executors())} "
                              "(--allow-executor or BRIDGE_ALLOW_EXECUTORS)")
    for ref in (args.model or environ.get("BRIDGE_MODEL"),
                args.escalate_to or environ.get("BRIDGE_ESCALATE_TO")):
        if ref:
            names.append(_executor_of(ref))
    return tuple(dict.fromkeys([DEFAULT_EXECUTOR, *names]))


def debug_wanted(args: argparse.Namespace, environ: dict) -> bool:
    """Return True when internal errors show their traceback: --debug, or BRIDGE_DEBUG
    set to anything but "" or "0"."""
    return args.debug or environ.get("BRIDGE_DEBUG", "") not in ("", "0")


def quiet_http_logs() -> None:
    """Keep httpx's log of every request (INFO) off the user's terminal, whatever logging
    a program embedding bridge set up. Logger levels are process-wide: the actions that
    make HTTP requests set them once, before any client or thread starts."""
    import logging
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _memory_setting(args: argparse.Namespace, environ: dict[str, str],
                    home: Path) -> tuple[str | None, str | None, str | None, str | None]:
    """Return (memory_url, memory_api_key, memory_source, memory_note): --memory-url, else
    BRIDGE_MEMORY_URL ("off": none), else the memory server's Claude Code hooks' loopback
    endpoint (hooks_memory_endpoint). Raises ConfigError (check_memory_url)."""
    url = _first(args.memory_url, environ.get("BRIDGE_MEMORY_URL"))
    key = environ.get("MCP_API_KEY") or None
    source = "--memory-url" if args.memory_url is not None else "BRIDGE_MEMORY_URL" if url else None
    note = None
    if url and url.strip().lower() == "off":
        url, note = None, f"{source} is off"
    elif not url:
        url, hooks_key, note = hooks_memory_endpoint(home)
        if url:
            source, key = HOOKS_CONFIG_SHOWN, key or hooks_key
    return (check_memory_url(url) if url else None), key, source, note


def resolve_config(args: argparse.Namespace, environ: dict[str, str]) -> Config:
    """Resolve every setting once: flag, then environment variable, then default.
    The rows of SETTINGS with a kind are read by _READERS; the others below. Raises
    ConfigError for a value that cannot be used, naming it."""
    given_url = _first(args.base_url, environ.get("BRIDGE_BASE_URL"))
    base_url = given_url or DEFAULT_BASE_URL
    if not re.match(r"^https?://[^/\s]+", base_url):
        raise ConfigError(f"base URL {base_url!r} is not an http(s) URL",
                          "pass e.g. --base-url http://localhost:1234/v1")
    values = {row.field: _READERS[row.kind](row, getattr(args, _dest(row.flag)),
                                             environ.get(row.env))
              for row in SETTINGS if row.kind}
    db = _first(args.db, environ.get("BRIDGE_DB"))
    state = _first(args.state_dir, environ.get("BRIDGE_STATE_DIR"))
    home = Path(environ.get("HOME") or Path.home())
    memory_url, memory_key, memory_source, memory_note = _memory_setting(args, environ, home)
    config_dir = default_config_dir(environ)
    return Config(
        **values,
        db_paths=(Path(db).expanduser(),) if db else tuple(default_db_candidates(environ)),
        db_explicit=bool(db),
        base_url=base_url.rstrip("/"),
        base_url_given=bool(given_url),
        state_dir=Path(state).expanduser() if state else default_state_dir(environ),
        memory_url=memory_url,
        memory_api_key=memory_key,
        memory_source=memory_source,
        memory_note=memory_note,
        anthropic_api_key=environ.get("ANTHROPIC_API_KEY") or None,
        # the user's environment less bridge's own settings and the memory server's key:
        # commands run in it; a claude-cli: model gets only its allow-listed part
        tool_env=tuple((k, v) for k, v in environ.items()
                       if not k.startswith("BRIDGE_") and k not in ("MCP_API_KEY",)),
        trusted_projects=_trusted_projects(config_dir, environ),
        config_dir=config_dir,
        home=home,
        allowed_executors=_allowed_executors(args, environ),
        events=args.events,
        deltas=args.deltas,
        review=args.review,
        crash_at=environ.get("BRIDGE_CRASH_AT") or None,     # test hook only
        verbosity=0 if args.quiet else 2 if args.verbose else 1,
        json=args.json,
        debug=debug_wanted(args, environ),
    )


# One row per action (after tarfile's CLI, whose --filter choices are its _NAMED_FILTERS):
# the flag (mutually exclusive with the others; metavar None: no value), its help, its
# handler, whether it prints a --json document, and the modifiers it takes (MODIFIERS).
# The handler (named, looked up by _call_action) gets the Config, the flag's value when it
# takes one, then its passed modifiers' values in the row's order. The first row is also
# the run when no action flag is given. tests/test_first_page.py reads this.
Action = namedtuple("Action", "flag metavar help handler json modifiers")
ACTIONS = tuple(map(Action._make, (
    ("--plan", "ID", "run the plan with this id", "_run", True,
     ("--rerun", "--resume", "--dry-run", "--review", "--events", "--deltas")),
    ("--list", None, "list pending plans (id, steps, created, objective)", "cmd_list", True,
     ("--all",)),
    ("--health", None, "check the model server and the store; exit 0 only when both are usable",
     "cmd_health", True, ()),
    ("--show", "ID", "show the last result of a plan, and its run log", "cmd_show", True, ()),
    ("--stats", None, "per model and validation type, from bridge's own runs: steps that passed "
     "on the first attempt, after retries, only on escalation, or failed; median tokens and "
     "seconds", "cmd_stats", True, ()),
    ("--validate", "FILE", "check a plan file (schema and semantic rules); exit 0 when valid, 1 "
     "with every problem", "cmd_validate", True, ()),
    ("--submit", "FILE", "validate a plan file and store it as a new plan memory (creates the "
     "store when --db names a new file)", "cmd_submit", True, ("--replace",)),
    ("--cancel", "ID", "cancel a plan that is not running nor finished", "cmd_cancel", False, ()),
    ("--diff", "ID", "show what the plan's last run (or --run RUN_ID) changed in its files, as "
     "a unified diff", "cmd_diff", True, ("--run",)),
    ("--undo", "ID", "put back every file the plan's last run (or --run RUN_ID) changed; "
     "refuses files changed since, unless --force", "cmd_undo", True, ("--run", "--force")),
    ("--apply", "ID", "write the files a --review run of the plan staged, once the files it "
     "read and replaces are unchanged", "cmd_apply", True, ()),
    ("--reject", "ID", "drop the files a --review run of the plan staged", "cmd_reject", True, ()),
    ("--schema", None, "print the plan JSON Schema", "cmd_schema", False, ()),
    ("--trust", "DIR", "trust a project folder and everything under it: plans whose project "
     "lies there run without approval", "cmd_trust", False, ()),
    ("--untrust", "DIR", "take a folder off the trusted projects", "cmd_untrust", False, ()),
    ("--approve", "ID", "let one plan run, as its content is now (a plan replaced with other "
     "content needs approval again)", "cmd_approve", False, ()),
)))

_RUN_ONLY = "goes with a run (no action flag, or --plan ID)"
# One row per modifier: a flag that only some actions take (their rows of ACTIONS say
# which). misuse: the usage error without one of them, or without the flag it needs
# (needs); refuses: flags it cannot go with, each with its error (None: misuse); passed:
# its value is a handler argument (else resolve_config reads it). Checked in this order.
Modifier = namedtuple("Modifier", "flag metavar help misuse needs refuses passed")
MODIFIERS = tuple(map(Modifier._make, (
    ("--all", None, "with --list: every plan, with its status", "--all goes with --list",
     None, (), True),
    ("--rerun", None, "with --plan: run a completed, failed, cancelled or stale plan again, "
     "from the start", "--rerun and --resume go with --plan ID", "--plan",
     (("--resume", "--rerun starts over, --resume continues: pick one"),), True),
    ("--resume", None, "with --plan: take over a stale plan (its bridge died), keeping the "
     "steps that had succeeded", "--rerun and --resume go with --plan ID", "--plan", (), True),
    ("--replace", None, "with --submit: soft-delete the live plan with the same id",
     "--replace goes with --submit FILE", None, (), True),
    ("--run", "RUN_ID", "with --diff or --undo: that run of the plan instead of its last",
     "--run RUN_ID goes with --diff ID or --undo ID", None, (), True),
    ("--force", None, "with --undo: put the originals back even over files changed since the "
     "run", "--force goes with --undo ID", None, (), True),
    ("--review", None, "with a run: stage the files it writes under --state-dir, not in the "
     "project; the plan waits as awaiting_review for --apply or --reject",
     "--review goes with a run (no action flag, or --plan ID [--rerun]), not --dry-run or "
     "--resume", None, (("--dry-run", None), ("--resume", None)), False),
    ("--dry-run", None, "with no action or --plan: check the plans that would run and print "
     "each step's exact messages, without a server; the store is not touched",
     f"--dry-run {_RUN_ONLY}", None, (), True),
    ("--events", None, "print the run as JSON events on stdout, one per line: a line per step "
     "and plan event (progress stays on stderr)", f"--events {_RUN_ONLY}", None,
     (("--dry-run", None), ("--json", "--events and --json both write to stdout: pick one")),
     False),
    ("--deltas", None, "with --events: also one delta event per streamed piece of text",
     "--deltas goes with --events", "--events", (), False),
)))


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser: at most one of ACTIONS, MODIFIERS, the output options
    and the settings (add_settings)."""
    parser = _Parser(
        prog="bridge", formatter_class=_HelpFormatter,
        usage="bridge [--plan ID [--rerun | --resume]] [--dry-run] [options]\n"
              "       bridge --list [--all] | --show ID | --health | --stats | --cancel ID "
              "[options]\n"
              "       bridge --diff ID | --undo ID [--force] [--run RUN_ID] [options]\n"
              "       bridge --review [--plan ID] | --apply ID | --reject ID [options]\n"
              "       bridge --validate FILE | --submit FILE [--replace] | --schema [options]\n"
              "       bridge --trust DIR | --untrust DIR | --approve ID [options]",
        description="Run plans from the doobidoo memory store on a local OpenAI-compatible "
                    "model. With no action flag, every pending plan runs, oldest first.",
        epilog="exit codes: 0 success or nothing to do, 1 a plan failed, 2 usage/config/store/"
               "server unusable, 70 internal error, 130 interrupted",
    )
    actions = parser.add_mutually_exclusive_group()
    for group, rows in ((actions, ACTIONS), (parser, MODIFIERS)):
        for row in rows:
            if row.metavar:
                group.add_argument(row.flag, metavar=row.metavar, help=row.help)
            else:
                group.add_argument(row.flag, action="store_true", help=row.help)
    documents = ", ".join(row.flag for row in ACTIONS[1:] if row.json)
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout "
                        f"({documents}, --dry-run, a run's summary)")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true",
                       help="show the prompts sent and the outputs")
    noise.add_argument("-q", "--quiet", action="store_true", help="show errors only")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks of internal errors (env BRIDGE_DEBUG)")
    add_settings(parser)
    parser.add_argument("--version", action="version", version=f"bridge {__version__}")
    return parser


def chosen_action(args: argparse.Namespace) -> Action:
    """The row of ACTIONS whose flag was given, else the first (a run)."""
    return next((row for row in ACTIONS[1:] if getattr(args, _dest(row.flag))), ACTIONS[0])


def _check_flag_combinations(parser: argparse.ArgumentParser, args: argparse.Namespace,
                             action: Action) -> None:
    """Refuse a modifier the action does not take, without the flag it needs, or with a
    flag it refuses (MODIFIERS): a usage error, exit 2."""
    for row in MODIFIERS:
        if not getattr(args, _dest(row.flag)):
            continue
        if row.flag not in action.modifiers or (row.needs and not getattr(args, _dest(row.needs))):
            parser.error(row.misuse)
        for other, message in row.refuses:
            if getattr(args, _dest(other)):
                parser.error(message or row.misuse)


###############################################################################
# 41. CLI: listing, what a run will do, stats, trust and approval
###############################################################################


def _print_json(document: Any) -> None:
    sys.stdout.write(json_text(document, indent=2) + "\n")


def _created(record: PlanRecord) -> str:
    if isinstance(record.created_at, (int, float)):
        return iso_from_ts(record.created_at)[:19].replace("T", " ")
    return str(record.created_at or "")[:19]


def plan_summary(record: PlanRecord) -> dict:
    """Return the --list row of a plan: id, status, objective, steps, created, row."""
    # a plan bridge would not read (too deep, too big: UnreadablePlan) says why in its place
    objective = record.plan.reason if isinstance(record.plan, UnreadablePlan) else record.objective
    return {"id": record.plan_id, "status": record.display_status, "objective": objective,
            "steps": record.step_count, "created": _created(record), "row": record.row_id,
            "error": record.state.get("error")
            or (SPLIT_PLAN_PROBLEM.format(chunks=record.chunks) if record.chunks else None)}


def cmd_list(config: Config, show_all: bool) -> int:
    """Print the pending plans (or, with show_all, every plan and its status)."""
    with Store.open(config) as store:
        records = store.find_plans()
    rows = []
    for record in records:
        if show_all or record.status == "pending":
            row = plan_summary(record)
            facts = _plan_facts(config, record) if record.display_status == "pending" else None
            if facts is not None and not facts["may_run"]:
                row.update(status="awaiting_approval", approval=facts)
            rows.append(row)
    if config.json:
        _print_json({"db": str(store.path), "layout": store.layout, "plans": rows,
                     "trusted_projects": [str(p) for p in config.trusted_projects]})
        return EXIT_OK
    if not rows:
        print(f"no {'' if show_all else 'pending '}plans in {store.path}")
        return EXIT_OK
    width = max(len(printable(r["id"])) for r in rows)
    status_width = max(len(r["status"]) for r in rows) + 2     # awaiting_approval is 17
    for r in rows:
        status = f"{r['status']:<{status_width}}" if show_all else ""
        print(printable(f"{printable(r['id']):<{width}}  {status}{r['steps']:>3} step(s)  "
                        f"{r['created']}  {r['objective']}"))
        if r["status"] == "awaiting_approval":
            print(f"  awaiting approval\n{render_facts(r['approval'])}")
        elif r["status"] == "invalid" and r["error"]:    # a split plan: why, and the fix
            print(printable(f"  invalid: {r['error']}"))
    return EXIT_OK


def ollama_num_ctx(config: Config, plans: list[Plan], info: ServerInfo) -> int:
    """Return the options.num_ctx (tokens) of a run on Ollama's native API: the largest
    first prompt of the checked plans (estimate_tokens) plus its answer (answer_tokens)
    and OLLAMA_NUM_CTX_SLACK, rounded up to OLLAMA_NUM_CTX_STEP, at least
    OLLAMA_MIN_NUM_CTX; the loaded context when that is as large (no reload); never past
    the trained context. aider asks the request plus 8k the same way (aider#4687)."""
    largest = 0
    for plan in plans:
        for step in plan.steps.values():
            try:
                messages = build_messages(plan, step, {})
            except (BridgeError, OSError):
                continue
            largest = max(largest, estimate_tokens(messages) + answer_tokens(step, None))
    need = max(largest + OLLAMA_NUM_CTX_SLACK, OLLAMA_MIN_NUM_CTX)
    if info.context_length and info.context_length >= need:
        return info.context_length
    num_ctx = max(OLLAMA_MIN_NUM_CTX, -(-need // OLLAMA_NUM_CTX_STEP) * OLLAMA_NUM_CTX_STEP)
    return min(num_ctx, info.trained_context) if info.trained_context else num_ctx


def run_plan(config: Config, client: LLMClient, info: ServerInfo) -> dict:
    """Return what a run on this server will do, for --health (and its --json, whose
    "server" object carries these keys; README, "Model servers"): model (str or None)
    and model_why; context_length (tokens prompts are fitted to, or None) and
    context_source; trained_context; slots (steps in flight); version; api (the chat route);
    structured_output and prompts_cut (sentences); refused ([{"model", "reason"}])."""
    try:
        model = _pick_model(config, info)
        why = info.why or ("--model" if config.model else "the model the server reports loaded")
    except LLMError as exc:
        model, why = None, f"{exc} ({exc.hint})" if exc.hint else str(exc)
    same = model is not None and parse_model_ref(model)[1] == info.loaded
    context, source = config.context_length, "--context-length"
    if context is None and client.native and same:
        context = ollama_num_ctx(config, [], info)
        source = "options.num_ctx, raised per run to fit its largest prompt (at most as trained)"
    elif context is None and same and info.context_length:
        context, source = info.context_length, f"reported by {info.kind}"
    if not config.structured:
        structured = "off (--no-structured)"
    elif client.native:
        structured = "JSON steps send their schema as format (Ollama's native API)"
    else:
        structured = ("JSON steps ask response_format json_schema (then json_object with a "
                      "schema, then none)")
    if client.native:
        cut = "no: num_ctx is set to fit every prompt"
    elif info.kind == "Ollama":
        cut = ("yes: Ollama's OpenAI endpoint cannot set num_ctx and cuts long prompts silently; "
               "bridge fails such an attempt (--ollama-api native avoids it)")
    elif context:
        cut = "no: prompts are fitted to the context; a cut seen in usage fails the attempt"
    else:
        cut = ("maybe: the context is not reported (pass --context-length); a cut seen in usage "
               "fails the attempt")
    return {"model": model, "model_why": why, "context_length": context,
            "context_source": source if context else None, "trained_context": info.trained_context,
            "slots": config.parallel or (info.parallel if same else None) or 1,
            "version": info.version,
            "api": f"{client.base_url}{client.CHAT_PATH}", "structured_output": structured,
            "prompts_cut": cut, "refused": [{"model": m, "reason": r} for m, r in info.refused]}


def cmd_stats(config: Config) -> int:
    """Print what each model did with each validation type over bridge's runs (read_step_stats)."""
    report = read_step_stats(config.runs_dir.parent / STATS_FILE)
    if config.json:
        _print_json(report)
        return EXIT_OK
    if not report["models"]:
        print(printable(f"no step records yet in {report['stats_file']} "
                        "(every step bridge runs adds one)"))
        return EXIT_OK
    print(printable(f"{report['steps']} step(s) recorded in {report['stats_file']}; "
                    "a step counts under each of its validation types"))
    for model, kinds in report["models"].items():
        print(printable(f"model {model}"))
        print(f"  {'validation':<16}{'steps':>6}{'first':>7}{'retries':>9}{'escalation':>12}"
              f"{'failed':>8}{'median tokens':>15}{'median s':>10}")
        for kind, row in kinds.items():
            print(printable(f"  {kind:<16}{row['steps']:>6}{row['first_attempt']:>7}"
                            f"{row['after_retries']:>9}{row['on_escalation']:>12}{row['failed']:>8}"
                            f"{row['median_tokens']:>15g}{row['median_s']:>10.1f}"))
    return EXIT_OK


def cmd_trust(config: Config, folder: str, trust: bool = True) -> int:
    """Add a folder to the trusted projects (trust) or take it off, in
    config_dir/trusted-projects.json. Raises ConfigError when the folder does not
    exist (trust), can never be trusted (untrustable_reason), or is not listed (untrust)."""
    path = Path(config.config_dir, TRUST_FILENAME)
    listed = [p for p in read_config_file(path, "trusted_projects", list) if isinstance(p, str)]
    real = real_path(folder)
    if trust:
        if not real.is_dir():
            raise ConfigError(f"cannot trust {folder}: no such folder",
                              "pass an existing project folder")
        if reason := untrustable_reason(config, real):
            raise ConfigError(f"refused to trust {real}: {reason}",
                              "trust the project's own folder instead")
        kept = [*listed, str(real)] if str(real) not in listed else listed
    else:
        kept = [p for p in listed if p != str(real) and p != folder]
        if kept == listed:
            raise ConfigError(f"{real} is not in the trusted projects ({path})",
                              "trusted: " + (", ".join(listed) or "none"))
    write_config_file(path, {"trusted_projects": kept})
    print(printable(f"{'trusted' if trust else 'no longer trusted'}: {real}"))
    still = config._replace(trusted_projects=tuple(map(real_path, kept)))
    if not trust and (root := trusted_root(still, real)):
        print(f"note: it is still inside the trusted {root}, or BRIDGE_TRUSTED_PROJECTS names it")
    return EXIT_OK


def cmd_approve(config: Config, plan_id: str) -> int:
    """Approve one plan for its current content (config_dir/approvals.json); print
    what it may do. Raises PlanNotFound, PlanInvalid, or ConfigError when its project
    can never be a target."""
    with Store.open(config) as store:
        record = store.get_plan(plan_id)
    plan = runnable_plan(record, config)
    digest = content_hash(record.content)
    if plan.project is not None and (reason := untrustable_reason(config, real_path(plan.project))):
        raise ConfigError(f"refused to approve plan {plan_id!r}: project {plan.project}: {reason}",
                          f"cancel it: bridge --cancel {plan_id}")
    approvals = load_approvals(config)
    approvals[plan.id] = {"content_hash": digest, "approved_at": utc_now_iso(),
                          "project": None if plan.project is None else str(real_path(plan.project))}
    write_config_file(Path(config.config_dir, APPROVALS_FILENAME), {"approvals": approvals})
    facts = approval_facts(config, plan, digest)
    print(printable(f"approved plan {plan.id!r} (content hash {digest[:12]}…); "
                    "it runs with the next bridge run"))
    print(render_facts(facts))
    return EXIT_OK


def render_facts(facts: dict) -> str:
    """Return approval_facts as indented lines for a person."""
    lines = [f"  project: {facts['project'] or '(none: no files)'}",
             f"  writes: {', '.join(facts['files']) or 'nothing'}",
             "  reads (sent to the model): " + (", ".join(
                 f"{read['path']}" + (f" (refused: {read['refused']})" if read["refused"] else "")
                 for read in facts["reads"]) or "no file"),
             f"  models: {', '.join(facts['models']) or 'the run model only'} "
             f"(executors: {', '.join(facts['executors']) or 'none'})"]
    lines += [_run_line(run) for run in facts["runs"]] or ["  runs: no command"]
    for limit in facts["limits"]:
        unit = " s" if limit["field"] == "timeout_s" else ""
        lines.append(f"  limit: step {limit['step']} asks {limit['field']} "
                     f"{limit['asked']:g}{unit}, above {limit['setting']} "
                     f"{limit['limit']:g}{unit}; "
                     f"{limit['used']:g}{unit} is used")
    lines += [f"  waits: {reason}" for reason in facts["reasons"]]
    if facts["commands"]:
        lines.append(f"  to run it: {commands_text(facts['commands'])}")
    if facts["escalation_unused"]:
        lines.append(f"  note: {facts['escalation_unused']}")
    return "\n".join(printable(line) for line in lines)     # plan strings: escaped


def _run_line(run: dict) -> str:
    """One command of approval_facts' runs, as render_facts shows it."""
    limit = run["timeout_s"]     # --list reads plans unchecked: any JSON value
    limit = f"{limit:g} s" if isinstance(limit, (int, float)) else repr(limit)
    return f"  runs: {run['what']}: `{shell_words(run['run'])}` in {run['cwd']}, timeout {limit}"


def commands_text(commands: list[str]) -> str:
    """Join approval_facts commands for a person: approving or trusting are
    alternatives ("or"); each executor to allow is needed besides ("and")."""
    either = [c for c in commands if not c.startswith("bridge --allow-executor")]
    needed = [c for c in commands if c.startswith("bridge --allow-executor")]
    text = " or ".join(either)
    if needed:
        text += (", and run with " if text else "run with ")
        text += " ".join(c.removeprefix("bridge ") for c in needed)
    return text


def _plan_facts(config: Config, record: PlanRecord) -> dict | None:
    """Return approval_facts of a record's plan for --list, read without the schema (it
    must not import jsonschema), or None when the plan cannot be read."""
    try:
        plan = _build_plan(record.plan)
    except (PlanInvalid, KeyError, TypeError, AttributeError, ValueError):
        return None
    return approval_facts(config, plan, content_hash(record.content))


def _may_ask() -> bool:
    """True when a person can answer a question: stdin and stderr are terminals."""
    return all(hasattr(f, "isatty") and f.isatty() for f in (sys.stdin, sys.stderr))


def _ask_to_run(facts: dict) -> bool:
    """Ask on the terminal whether a plan waiting only for approval runs this once
    (default No; end of input is No)."""
    sys.stderr.write(f"plan {printable(facts['plan_id'])} needs your approval:\n"
                     f"{render_facts(facts)}\nrun it this time? [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def gate_records(config: Config, records: list[PlanRecord],
                 progress: Progress) -> tuple[list[CheckedPlan], list[dict]]:
    """Split the records a run would claim into ([CheckedPlan] that run, [approval facts]
    of those that wait). Invalid plans run (to be recorded failed). A plan waiting only
    for approval is asked about on a terminal (default No); else it is skipped with a
    line naming the command that would let it run. Nothing is written for a waiting plan."""
    runnable, waiting = [], []
    for record in records:
        try:
            plan = runnable_plan(record, config)
        except PlanInvalid as exc:
            runnable.append(CheckedPlan(record, None, exc.problems, False))
            continue
        facts = approval_facts(config, plan, content_hash(record.content))
        checked = CheckedPlan(record, plan, [], facts["trusted"])
        if facts["may_run"]:
            runnable.append(checked)
            continue
        only_approval = all(c.startswith(("bridge --approve", "bridge --trust"))
                            for c in facts["commands"])
        if only_approval and _may_ask() and _ask_to_run(facts):
            runnable.append(checked)
            continue
        waiting.append(facts)
        progress.info(f"plan {record.plan_id}: awaiting approval: {'; '.join(facts['reasons'])}; "
                      f"to run it: {commands_text(facts['commands'])}")
        for line in render_facts(facts).splitlines():      # what approving it would let happen
            if not line.startswith(("  waits:", "  to run it:")):
                progress.info(line)
    return runnable, waiting


###############################################################################
# 42. CLI: health
#
# --health: the model server (and what a run on it will do: run_plan), the store as
# bridge and the memory server see it, the kept backups, and the memory server's HTTP
# API when one is set; as lines, or one --json document.
###############################################################################


def run_plan_lines(server: dict) -> list[str]:
    """The --health lines under the server's: what a run will do (see run_plan)."""
    lines = []
    if server.get("model"):
        context = (f"context {server['context_length']} ({server['context_source']})"
                   if server.get("context_length") else "context not reported")
        trained = f"; trained {server['trained_context']}" if server.get("trained_context") else ""
        lines.append(f"model {server['model']} ({server['model_why']}) · {context}{trained} · "
                     f"{server['slots']} step(s) at once · {server['api']}")
        lines.append(f"output: {server['structured_output']} · "
                     f"prompts cut: {server['prompts_cut']}")
    for refused in server.get("refused") or []:
        lines.append(f"refused {refused['model']}: {refused['reason']}")
    for tried in server.get("tried") or []:
        lines.append(f"tried {tried['url']}: {tried['result']}")
    return lines


def _memory_store_line(info: dict) -> str:
    """The --health line of the store as the memory server sees it."""
    schema = (f"schema version {info['schema_version']}" if info["schema_version"]
              else "no schema version")
    state = (f"{STATE_TABLE}: {info['plans_recorded']} plan(s)" if info["state_table"]
             else f"no {STATE_TABLE} yet (made by the first run)")
    if info["without_embedding"] is None:
        embeddings = "embeddings not readable (no memory_embeddings table)"
    else:
        embeddings = (f"{info['without_embedding']} of bridge's {info['bridge_rows']} row(s) "
                      "without an embedding"
                      + (" (semantic search misses them; --memory-url stores results with one)"
                         if info["without_embedding"] else ""))
    return f"ok    {schema} · {state} · {embeddings}"


def _memory_setting_text(setting: dict) -> str:
    """The end of the --health memory line: where the HTTP API setting came from, or,
    with none set, why not and where one could be set."""
    if setting["url"]:
        return f" (set by {setting['source']})"
    why = f"{setting['note']}; " if setting["note"] else ""
    return f" · HTTP API none set ({why}--memory-url, BRIDGE_MEMORY_URL or {HOOKS_CONFIG_SHOWN})"


def _memory_api_line(probe: dict) -> str:
    """The --health line of the memory server's HTTP API."""
    if not probe["key_accepted"]:
        return printable(f"FAIL  {probe['url']}: {probe['error']}")
    return printable(f"ok    {probe['url']} answers (mcp-memory-service {probe['version']}, "
                     f"{probe['backend']}) · key accepted")


def _server_health(config: Config) -> tuple[Config, dict, bool]:
    """Probe the model server (discover_server when no base URL is set): return the config
    with its base URL, the report's "server" part, and whether a run could use it."""
    report: dict[str, Any] = {"base_url": config.base_url}
    config, tried = discover_server(config)
    report.update(base_url=config.base_url, tried=tried)
    ok = False
    try:
        with LLMClient(config) as client:
            info = client.probe()
            models = info.models
            report.update(reachable=True, kind=info.kind, models=models, loaded=info.loaded,
                          context_length=info.context_length, parallel=info.parallel)
            report.update(run_plan(config, client, info))
            ok = bool(models) and not info.problem
            if not models:
                report["error"] = "the server lists no models; download or load one"
            elif not ok:
                report["error"] = report["model_why"]
    except LLMError as exc:
        report.update(reachable=False, error=str(exc), hint=exc.hint)
    return config, report, ok


def _store_health(config: Config) -> tuple[dict, bool]:
    """Open and check the store: return the report's "store" part and whether it is usable."""
    report: dict[str, Any] = {}
    ok = False
    try:
        with Store.open(config) as store:
            report.update(path=str(store.path), layout=store.layout, fts=store.has_fts)
            problem = store.check_usable()
            if problem:
                raise StoreError(f"the store {store.path} is not usable: {problem}",
                                 READ_ONLY_STORE_HINT if "readonly" in problem else
                                 "restore it from a backup, or point --db at a store that can "
                                 "be written")
            report.update(pending=store.pending_count(), **store.memory_report())
            ok = True
    except StoreError as exc:
        report.update(error=str(exc), hint=exc.hint)
    return report, ok


def _print_health(config: Config, report: dict, server_ok: bool, store_ok: bool) -> None:
    """Print the --health report as lines: server, run plan, store and memory, backups."""
    server, store_info = report["server"], report["store"]
    if server_ok:
        version = f" {server['version']}" if server.get("version") else ""
        print(printable(f"server  ok    {config.base_url} ({server['kind']}{version}) · "
                        f"{len(server['models'])} model(s) · loaded: "
                        f"{server['loaded'] or 'none reported'} · context "
                        f"{server['context_length'] or 'not reported'} · parallel "
                        f"{server['parallel'] or 1}"))
    else:
        _print_failure("server  ", server)
    for line in run_plan_lines(server):
        print(printable(f"              {line}"))
    memory_setting = _memory_setting_text(report["memory_setting"])
    if store_ok:
        print(printable(f"store   ok    {store_info['path']} · {store_info['layout']} · "
                        f"{store_info['pending']} pending plan(s)"))
        line = _memory_store_line(store_info)
        if "memory_api" in report:     # one memory line: store and API
            api = _memory_api_line(report["memory_api"])
            line = f"{api[:6]}{line[6:]} · HTTP API {api[6:]}"    # FAIL when the API fails
        print(printable("memory  " + line + memory_setting))
    else:
        _print_failure("store   ", store_info)
    backups = report["backups"]
    print(f"backups       {backups['bytes']:,} bytes in {backups['runs']} run(s) under "
          f"{backups['path']} (kept for --undo: the last {backups['keep_runs']} run(s) of each "
          "plan)")
    if "memory_api" in report and not store_ok:
        print(printable("memory  " + _memory_api_line(report["memory_api"]) + memory_setting))


def _print_failure(label: str, part: dict) -> None:
    """Print a failed part of the --health report: its error, then its hint."""
    print(printable(f"{label}FAIL  {part['error']}"))
    if part.get("hint"):
        print(printable(f"              hint: {part['hint']}"))


def cmd_health(config: Config) -> int:
    """Check the server, the store and the memory server's HTTP API when one is set; print
    the report (--json: as a document); return 0 only when all of them work, else 2."""
    quiet_http_logs()
    config, server, server_ok = _server_health(config)
    store, store_ok = _store_health(config)
    report: dict[str, Any] = {"server": server, "store": store}
    report["backups"] = {**backups_usage(config.runs_dir), "path": str(config.runs_dir),
                         "keep_runs": config.keep_runs}
    memory_ok = True
    report["memory_setting"] = {"url": config.memory_url, "source": config.memory_source,
                                "note": config.memory_note}
    if config.memory_url:
        api = MemoryAPI(config.memory_url, config.memory_api_key, timeout_s=5.0)
        report["memory_api"] = api.probe()
        memory_ok = bool(report["memory_api"]["key_accepted"])
    report["ok"] = server_ok and store_ok and memory_ok
    if config.json:
        _print_json(report)
    else:
        _print_health(config, report, server_ok, store_ok)
    return EXIT_OK if report["ok"] else EXIT_UNUSABLE


###############################################################################
# 43. CLI: running and showing
###############################################################################


def cmd_run(config: Config, plan_id: str | None, rerun: bool = False, resume: bool = False) -> int:
    """Run one plan (plan_id) or every pending plan (_never_run; invalid ones and those
    sharing an id are recorded failed); print the summary. Returns EXIT_OK when every
    plan completed (or none was pending), EXIT_PLAN_FAILED when one failed, EXIT_UNUSABLE
    when a result could not be stored (said; the other plans still run). Raises
    BridgeError when the store or the server cannot be used, before a claim."""
    progress = Progress(config.verbosity)
    with Store.open(config) as store:
        records, allowed, shared = _plans_to_run(store, plan_id, rerun, resume)
        if records and not config.base_url_given:
            config, tried = discover_server(config)
            if tried and tried[-1]["result"].endswith("used"):
                progress.info(f"model server: found at {config.base_url} (no --base-url given)")
        if not records:
            progress.info(f"no pending plans in {store.path}")
        records, waiting = gate_records(config, records, progress)
        results, not_recorded = [], 0
        with LLMClient(config, on_retry=progress.retrying) as client:
            runner = _open_runner(config, store, client, progress, records) if records else None
            try:
                for checked in records:
                    record = checked.record
                    try:
                        result = runner.run_record(checked, allowed, shared.get(record.plan_id),
                                                   resume)
                    except ResultNotStored as exc:     # the plans after it still run
                        progress.error(str(exc), exc.hint)
                        runner.events.emit("error", record.plan_id, message=str(exc), hint=exc.hint,
                                           exit_code=exc.exit_code)
                        not_recorded += 1
                        continue
                    if result is None and plan_id is not None:
                        raise BridgeError(f"plan {plan_id!r} was claimed by another bridge "
                                          "process first", "see it with: bridge --list --all")
                    results += [result] if result is not None else []
            finally:
                if runner is not None:
                    runner.close()
    if len(results) > 1:
        progress.info(run_summary(results))
    if waiting:
        progress.info(f"run: {len(waiting)} plan(s) await approval; see them with: bridge --list")
    if config.json:
        _print_json({"plans": results, **({"awaiting_approval": waiting} if waiting else {})})
    if not_recorded:
        return EXIT_UNUSABLE
    return EXIT_OK if all(r["success"] for r in results) else EXIT_PLAN_FAILED


def _plans_to_run(store: Store, plan_id: str | None, rerun: bool,
                  resume: bool) -> tuple[list[PlanRecord], tuple[str, ...], dict[str, list[str]]]:
    """Return (records, statuses they may be claimed from, problems of shared ids)."""
    if plan_id is not None:
        record = store.get_plan(plan_id)
        return [record], _allowed_statuses(record, rerun, resume), {}
    plans = store.find_plans()
    return _never_run(plans), ("pending", "invalid"), shared_id_problems(plans)


def _never_run(plans: list[PlanRecord]) -> list[PlanRecord]:
    """The plans a run of every pending plan takes: pending ones, and invalid ones never run."""
    return [r for r in plans if r.status == "pending" or (r.status == "invalid" and not r.state)]


def _open_runner(config: Config, store: Store, client: LLMClient, progress: Progress,
                 checked: list[CheckedPlan] | None = None) -> Runner:
    """Probe the server, pick the model, context and parallel slots; return a Runner
    whose executors are checked (no key, no claude binary: said before any claim). On
    Ollama's native API the context is the run's num_ctx, sent with every request."""
    local = config.model is None or executor_class(config.model).PROBED
    info = client.probe() if local else None
    client.server_kind = info.kind if info else None
    model = _pick_model(config, info)
    # the server's numbers fit its loaded model only
    same = info is not None and parse_model_ref(model)[1] == info.loaded
    if same and client.native:
        plans = [c.plan for c in checked or [] if c.plan is not None]
        client.num_ctx = config.context_length or ollama_num_ctx(config, plans, info)
        info = info._replace(context_length=client.num_ctx)
    context = config.context_length or (info.context_length if same else None)
    parallel = config.parallel or (info.parallel if same else None) or 1
    runner = Runner(config, store, client, model, progress)
    fit = runner.fit
    fit.context_length, fit.parallel = context, max(1, parallel)
    fit.reprobe = info is not None and info.kind == "LM Studio" \
        and not (same and info.context_length)
    if context and parallel > 1 and info is not None and info.kind in ("llama.cpp", "LM Studio"):
        fit.pool = ContextPool(context)      # one KV pool: llama.cpp PR #16736, LM Studio lms#565
    for ref in (model, config.escalate_to):
        if ref:
            runner.executor(ref)
    return runner


def run_summary(results: list[dict]) -> str:
    """Return the closing line of a run over several plans."""
    completed = sum(1 for r in results if r["success"])
    steps = {k: sum(r["counts"][k] for r in results) for k in ("succeeded", "failed", "skipped")}
    tokens = sum(r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] for r in results)
    seconds = sum(r["duration_s"] for r in results)
    return (f"run: {len(results)} plan(s), {completed} completed, "
            f"{len(results) - completed} failed · steps {steps['succeeded']} succeeded, "
            f"{steps['failed']} failed, {steps['skipped']} skipped · "
            f"{tokens} tokens · {seconds:.1f} s")


def shared_id_problems(plans: list[PlanRecord]) -> dict[str, list[str]]:
    """Return {plan id: [problem]} for every id that several live plans share."""
    rows: dict[str, list[str]] = {}
    for record in plans:
        rows.setdefault(record.plan_id, []).append(str(record.row_id))
    return {plan_id: [f"$.id: plan id {plan_id!r} is used by {len(ids)} live memories (rows "
                      f"{', '.join(ids)}); delete all but one"]
            for plan_id, ids in rows.items() if len(ids) > 1}


def _allowed_statuses(record: PlanRecord, rerun: bool, resume: bool) -> tuple[str, ...]:
    """Return the statuses --plan may claim, or raise BridgeError saying what to do."""
    status = record.display_status
    if resume:
        if status == "in_progress":
            raise BridgeError(f"plan {record.plan_id!r} is in progress, not stale (pid "
                              f"{record.owner.get('pid')} on {record.owner.get('host')})",
                              "--resume takes over a plan whose bridge died; wait for this one")
        if status != "stale":
            raise BridgeError(f"plan {record.plan_id!r} is {status}, not stale",
                              "--resume takes over a plan whose bridge died; "
                              "use --rerun to start over")
        return ("stale",)
    if status == "pending":
        return ("pending",)
    if status == "in_progress":
        owner = record.owner
        raise BridgeError(f"plan {record.plan_id!r} is in progress (pid {owner.get('pid')} on "
                          f"{owner.get('host')}, since {record.state.get('claimed_at')})",
                          "wait for it to finish, or stop that process")
    if status == "stale" and not rerun:
        raise BridgeError(f"plan {record.plan_id!r} is stale: its bridge process died mid-run",
                          "take it over with --resume (keeps finished steps) "
                          "or --rerun (starts over)")
    if status == "awaiting_review" and not rerun:
        raise BridgeError(f"plan {record.plan_id!r} is awaiting review of its staged files",
                          f"see them with bridge --diff {record.plan_id}, then bridge --apply "
                          f"{record.plan_id} or bridge --reject {record.plan_id}")
    if not rerun:
        raise BridgeError(f"plan {record.plan_id!r} is {status}", "pass --rerun to run it again")
    return (status,)


def cmd_show(config: Config, plan_id: str) -> int:
    """Print the last stored result of a plan (--json: the document itself). Raises
    PlanNotFound, or BridgeError when the plan has no result yet."""
    with Store.open(config) as store:
        record = store.get_plan(plan_id)
        found = store.find_result(record)
        other = store.find_result(record, named_only=False) if found is None else None
        replaced = store.replaced_runs(record)
    if found is None and replaced:
        # bridge's state names runs of content this plan had before --submit --replace
        run, status = replaced[-1]
        raise BridgeError(f"plan {plan_id!r} has no stored result of its current content yet "
                          f"(it is {record.display_status}); its replaced content's last run was "
                          f"{run} (now {status})", run_hint(record, config.runs_dir))
    if found is None:
        note = ""
        if other is not None:       # tagged as its result by someone, named by no state of bridge's
            note = (f"; a memory tagged as its result ({other[1][:12]}…, run "
                    f"{clip(repr(other[0].get('run_id')), 60, 'run id')}) was not recorded by "
                    "bridge and is not shown")
        raise BridgeError(f"plan {plan_id!r} has no stored result yet (it is "
                          f"{record.display_status}){note}", run_hint(record, config.runs_dir))
    result = show_document(found, record, replaced, config.runs_dir)
    if config.json:
        _print_json(result)
    else:
        print(render_show(result, record, config.runs_dir))
    return EXIT_OK


###############################################################################
# 44. CLI: diff, undo, review
###############################################################################


def _kept_run(config: Config, plan_id: str, run_id: str | None) -> tuple[PlanRecord, KeptRun]:
    """Return a plan's record and its run run_id (default: its last, from its state;
    checked like --run). Raises PlanNotFound, BridgeError when it never ran."""
    with Store.open(config) as store:
        record = store.get_plan(plan_id)
    if run_id is None:
        run_id = record.state.get("run_id")
        if run_id is None:
            raise BridgeError(f"plan {plan_id!r} has not run yet "
                              f"(it is {record.display_status})", run_hint(record))
    return record, KeptRun.load(config.runs_dir, run_id, record.plan_id)


def cmd_diff(config: Config, plan_id: str, run_id: str | None) -> int:
    """Print what a run changed: per file its action, whether it changed since, and the
    unified diff from its original to the file now (--json: {"plan_id", "run_id",
    "project", "reverted", "undone_at", "files": KeptRun.diff()}); of a run awaiting
    review, what --apply would change (KeptRun.staged_diff; --json: "awaiting_review")."""
    record, kept = _kept_run(config, plan_id, run_id)
    staged = kept.awaiting_review
    files = kept.staged_diff() if staged else kept.diff()
    if config.json:
        facts = {"project": str(kept.project), "awaiting_review": True} if staged else {
            "project": str(kept.project) if kept.project else None,
            "reverted": kept.reverted, "undone_at": kept.undone_at}
        _print_json({"plan_id": record.plan_id, "run_id": kept.run_id, **facts, "files": files})
        return EXIT_OK
    state = " · undone at " + kept.undone_at if kept.undone_at else \
        " · the run put its files back itself" if kept.reverted else ""
    where = f"project {kept.project}" if kept.project else "no project"
    if staged:
        state = f" staged for review: what bridge --apply {record.plan_id} would change"
    print(printable(f"run {kept.run_id} of plan {record.plan_id} · {where} · "
                    f"{len(files)} file(s){state}"))
    for entry in files:
        if staged:
            line = f"would be {entry['action']}" + (" · changed since the run: --apply will "
                                                     "refuse" if entry["changed_since_run"] else "")
        else:
            line = f"{entry['action']} · " + (
                "missing now" if entry["current_sha256"] is None else
                "changed since the run" if entry["changed_since_run"] else "as the run left it")
        print(printable(f"=== {entry['path']}: {line}"))
        sys.stdout.write(printable(entry["diff"], multiline=True))     # a model wrote those lines
    return EXIT_OK


def _awaiting(config: Config, plan_id: str) -> tuple[PlanRecord, KeptRun]:
    """Return a plan awaiting review and its staged run. Raises BridgeError otherwise."""
    record, kept = _kept_run(config, plan_id, None)
    if record.display_status != "awaiting_review" or not kept.awaiting_review:
        raise BridgeError(f"plan {plan_id!r} is {record.display_status}, not awaiting review",
                          "a run with --review stages its files for --apply or --reject")
    return record, kept


def cmd_apply(config: Config, plan_id: str) -> int:
    """Write the files a --review run staged (KeptRun.apply), once none of the files it
    read or will replace changed since the run; the plan becomes completed. Raises
    BridgeError naming every changed file, changing nothing."""
    record, kept = _awaiting(config, plan_id)
    conflicts = kept.apply_conflicts()
    if conflicts:
        raise BridgeError(f"not applying run {kept.run_id}: {len(conflicts)} file(s) changed "
                          "since the run: " + ", ".join(conflicts),
                          f"see bridge --diff {plan_id}; bridge --reject {plan_id}, "
                          "then run it again")
    with Store.open(config) as store:
        if not store.claim(record, kept.run_id, ("awaiting_review",)):     # one --apply at a time
            raise BridgeError(f"plan {plan_id!r} is no longer awaiting review",
                              "see bridge --list --all")
        try:
            summary = kept.apply(config.crash_at)
        except BaseException:
            store.record_review(record, kept.run_id, "in_progress",
                                {"status": "awaiting_review", "owner": None})
            raise
        store.record_review(record, kept.run_id, "in_progress", {
            "status": "completed", "applied_at": utc_now_iso(), "owner": None,
            "finished_at": utc_now_iso()})
    for run_dir in plan_runs(config.runs_dir, record.plan_id):
        keep_backups(run_dir)
    prune_backups(config.runs_dir, record.plan_id, config.keep_runs)
    if config.json:
        _print_json({"plan_id": plan_id, "run_id": kept.run_id, "files": summary})
        return EXIT_OK
    print(printable(f"applied run {kept.run_id} of plan {plan_id}: {len(summary)} file(s) written"))
    for change in summary:
        print(printable(f"  {change['path']}: {change['action']}"))
    return EXIT_OK


def cmd_reject(config: Config, plan_id: str) -> int:
    """Drop the files a --review run staged; the plan becomes cancelled (rerun it with
    --plan ID --rerun). Raises BridgeError when it is not awaiting review."""
    record, kept = _awaiting(config, plan_id)
    with Store.open(config) as store:
        if not store.record_review(record, kept.run_id, "awaiting_review", {
                "status": "cancelled", "rejected_at": utc_now_iso(),
                "error": "staged files rejected at review"}):
            raise BridgeError(f"plan {plan_id!r} is no longer awaiting review",
                              "see bridge --list --all")
    remove_tree(kept.run_dir / "staged")
    if config.json:
        _print_json({"plan_id": plan_id, "run_id": kept.run_id, "dropped": list(kept.staged)})
        return EXIT_OK
    print(printable(f"rejected run {kept.run_id} of plan {plan_id}: {len(kept.staged)} "
                    "staged file(s) dropped, nothing written"))
    return EXIT_OK


def cmd_undo(config: Config, plan_id: str, run_id: str | None, force: bool) -> int:
    """Put back the files a run changed (KeptRun.undo) and record it in the plan's state.
    A run already undone, that put its files back itself or changed none, is a no-op
    (saying so; nothing recorded). Raises BridgeError when the plan is running or stale,
    or KeptRun.undo refuses."""
    record, kept = _kept_run(config, plan_id, run_id)
    if record.display_status in ("in_progress", "stale", "awaiting_review"):
        raise BridgeError(f"plan {plan_id!r} is {record.display_status}; "
                          "not undoing a run under it", run_hint(record))
    shown = {"plan_id": plan_id, "run_id": kept.run_id}
    if kept.undone_at or kept.reverted or not kept.files:
        why = (f"was undone at {kept.undone_at}" if kept.undone_at else
               "put its files back itself" if kept.reverted else "changed no file")
        if config.json:
            _print_json({**shown, "undone_at": kept.undone_at, "restored": [],
                         "nothing_to_do": f"the run {why}"})
        else:
            print(printable(f"run {kept.run_id} of plan {plan_id} {why}: nothing to undo"))
        return EXIT_OK
    restored = kept.undo(force)
    with Store.open(config) as store:
        store.record_undo(store.get_plan(plan_id), kept.run_id,
                          kept.undone_at)   # type: ignore[arg-type]
    if config.json:
        _print_json({**shown, "undone_at": kept.undone_at, "restored": restored})
        return EXIT_OK
    print(printable(f"undid run {kept.run_id} of plan {plan_id}: {len(restored)} file(s) put back"))
    for kept_file in kept.files:
        verb = "removed (the run created it)" if kept_file.action == "created" else "restored"
        print(printable(f"  {kept_file.path}: {verb}"))
    return EXIT_OK


###############################################################################
# 45. CLI: the planner's side
# Plan files checked and stored, plans cancelled, runs rehearsed without a server.
###############################################################################


def _read_plan_file(path: str) -> Any:
    """Return the parsed JSON of a plan file. Raises PlanInvalid (not JSON) or
    BridgeError (unreadable)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise BridgeError(f"cannot read the plan file {path}: {exc}", "check the path") from exc
    try:
        return load_json(text)
    except JSONRefused as exc:
        raise PlanInvalid(str(path), [f"$: the plan {exc}"]) from None
    except ValueError as exc:
        raise PlanInvalid(str(path), [f"$: not JSON ({exc})"]) from exc


def cmd_validate(config: Config, path: str) -> int:
    """Check a plan file with the schema and the semantic rules; print every
    problem with its JSON path. Returns EXIT_OK or EXIT_PLAN_FAILED."""
    raw = None
    try:
        raw = _read_plan_file(path)
        plan = check_plan(raw, Guard.of(config))
        problems, plan_id = [], plan.id
    except PlanInvalid as exc:
        problems = exc.problems
        # an invalid plan that has an id is still named by it
        plan_id = raw.get("id") if isinstance(raw, dict) else None
        plan_id = plan_id if isinstance(plan_id, str) else None
    if config.json:
        _print_json({"file": str(path), "valid": not problems, "plan_id": plan_id,
                     "problems": problems})
    elif problems:
        print(printable(f"{path}: invalid plan, {len(problems)} problem(s):"))
        for problem in problems:
            print(printable(f"  {problem}"))
    else:
        print(printable(f"{path}: valid plan {plan_id!r} ({len(plan.steps)} step(s))"))
    return EXIT_PLAN_FAILED if problems else EXIT_OK


def cmd_submit(config: Config, path: str, replace: bool) -> int:
    """Validate a plan file and store it as a new plan memory. A --db naming a file
    that does not exist gets a new store in the 12.x layout (--json: created_store).
    Raises PlanInvalid, or StoreError when the id is taken (without replace), this
    content is stored already, or the store cannot be written."""
    raw = _read_plan_file(path)
    check_plan(raw, Guard.of(config))
    target = config.db_paths[0]
    created = config.db_explicit and not target.exists()
    if created:
        Store.create(target)
        if not config.json:
            print(printable(f"created a new, empty store at {target} "
                            "(the memory server's 12.x layout)"))
    with Store.open(config) as store:
        digest, replaced = store.submit(raw, replace)
        where = store.path
    if config.json:
        _print_json({"plan_id": raw["id"], "content_hash": digest, "db": str(where),
                     "replaced_rows": replaced, "created_store": created})
    else:
        note = (f"; soft-deleted the previous one (row {', '.join(map(str, replaced))})"
                if replaced else "")
        print(printable(f"submitted plan {raw['id']!r} to {where} "
                        f"(content hash {digest[:12]}…){note}"))
    return EXIT_OK


def cmd_cancel(config: Config, plan_id: str) -> int:
    """Cancel a plan that is not running nor finished (CANCELLABLE_STATUSES).
    Raises BridgeError when it is."""
    with Store.open(config) as store:
        record = store.get_plan(plan_id)
        if not store.cancel(record):
            status = store.reload(record).display_status
            raise BridgeError(f"plan {plan_id!r} is {status}; only a plan that is not running nor "
                              "finished can be cancelled", run_hint(store.reload(record)))
    print(printable(f"cancelled plan {plan_id!r}"))
    if record.display_status == "stale":        # as it was just before: its dead run's files stay
        print("note: the files its last run left are as that run left them; bridge changed none")
    return EXIT_OK


def cmd_dry_run(config: Config, plan_id: str | None) -> int:
    """Print each step's exact messages of the plans that would run, in run order, with
    dependency outputs as placeholders; no server, store untouched. Returns
    EXIT_PLAN_FAILED when a plan is invalid, else EXIT_OK."""
    with Store.open(config) as store:
        records = [store.get_plan(plan_id)] if plan_id else _never_run(store.find_plans())
    report = [dry_run_plan(record, config) for record in records]
    if config.json:
        _print_json({"plans": report})
    else:
        if not report:
            print("no pending plans")
        for entry in report:
            print(_render_dry_run(entry))
    return EXIT_OK if all(entry["valid"] for entry in report) else EXIT_PLAN_FAILED


def dry_run_plan(record: PlanRecord, config: Config) -> dict:
    """Return what a run of one plan would send: {"plan_id", "valid", "problems",
    "steps": [{"id", "title", "messages", "error", "response_format", "file_output",
    "commands": [{"run", "timeout_s"}]}] in run order, "verify", "commands_trusted"
    (plan_trusted), "approval" (approval_facts)}. A grounded step that depends on others
    shows the usual schema: its spans come from outputs not made yet."""
    try:
        plan = runnable_plan(record, config)
    except PlanInvalid as exc:
        return {"plan_id": record.plan_id, "valid": False, "problems": exc.problems, "steps": []}
    placeholders = {sid: f"<the output of step {sid}, once it has run>" for sid in plan.steps}
    steps, targets = [], set()
    for sid in sequential_order(step_graph(plan)):
        step = plan.steps[sid]
        budget = prompt_budget(step, config.context_length)
        sources: list[str] = []
        try:
            blocks = prompt_blocks(plan, step, placeholders)
            messages = fitted_messages(step, blocks, budget, sources)
            error = None
        except PromptTooLarge as exc:
            messages, error = [], str(exc)
        # a grounded step's spans are known only when no output of another step is in its input
        schema = output_schema(step.validation, None if step.depends_on else sources)
        form = RESPONSE_FORMS[0](schema) if schema is not None and config.structured else None
        steps.append({"id": sid, "title": step.title, "messages": messages, "error": error,
                      "response_format": form, "file_output": _dry_run_target(plan, step, targets),
                      "commands": [_command_entry(v) for v in _commands_of(step)]})
    facts = approval_facts(config, plan, content_hash(record.content))
    return {"plan_id": plan.id, "valid": True, "problems": [], "steps": steps,
            "verify": _command_entry(plan.verify) if plan.verify else None,
            "commands_trusted": facts["trusted"], "approval": facts}


def _command_entry(command: dict) -> dict:
    return {"run": list(command["run"]),
            "timeout_s": command.get("timeout_s", COMMAND_DEFAULT_TIMEOUT_S)}


def _dry_run_target(plan: Plan, step: Step, targets: set[str]) -> dict | None:
    """Return {"path", "target" (absolute), "action": "create" | "overwrite"} of a
    step's file_output, or None. A file an earlier step writes is overwritten."""
    if not step.file_output:
        return None
    target = os.path.abspath(plan.project / step.file_output)   # type: ignore[operator]
    action = "overwrite" if step.file_output in targets or os.path.lexists(target) else "create"
    targets.add(step.file_output)
    return {"path": step.file_output, "target": target, "action": action}


def _render_dry_run(entry: dict) -> str:
    """Return one plan's --dry-run report as text, every line through printable()."""
    if not entry["valid"]:
        lines = [f"plan {entry['plan_id']}: invalid"] + [f"  {p}" for p in entry["problems"]]
        return "\n".join(map(printable, lines))
    facts = entry["approval"]
    if not facts["may_run"]:        # a real run sends nothing: it waits (approval_facts)
        count = len(entry["steps"])
        head = (f"plan {entry['plan_id']}: valid · awaiting approval: a run sends nothing "
                f"until you let it; then these {count} step(s), in this order")
    else:
        head = (f"plan {entry['plan_id']}: valid · {len(entry['steps'])} step(s) would be "
                "sent, in this order")
    lines = [printable(head), render_facts(facts)]
    for step in entry["steps"]:
        title = f" ({step['title']})" if step["title"] else ""
        lines.append(printable(f"=== step {step['id']}{title}"))
        if step["error"]:
            lines.append(printable(f"would fail: {step['error']}"))
        for message in step["messages"]:
            lines.append(f"--- {message['role']} ---\n"
                         + printable(message["content"], multiline=True))
        if step["response_format"]:
            lines.append(f"--- response_format ---\n{json_text(step['response_format'])}")
        if target := step["file_output"]:
            lines.append("--- file_output ---")
            lines.append(printable(f"would {target['action']} {target['target']}"))
        lines += [_render_command("check", command, entry["commands_trusted"])
                  for command in step["commands"]]
    if entry["verify"]:
        lines.append(_render_command("verify", entry["verify"], entry["commands_trusted"]))
    return "\n".join(lines)


def _render_command(what: str, command: dict, trusted: bool) -> str:
    note = "" if trusted else " (would not run: commands run only in trusted projects)"
    return printable(f"--- {what}: `{shell_words(command['run'])}` in the project, "
                     f"timeout {command['timeout_s']:g} s{note}")


###############################################################################
# 46. main()
###############################################################################


def _raise_interrupt(signum: int, frame: Any) -> None:
    """Stop the run at the first Ctrl-C or SIGTERM, ignoring every later one at once: a
    second one before the cleanup shields itself would cut the restore of files short."""
    _ignore_interrupts()
    raise KeyboardInterrupt


def _ignore_interrupts() -> None:
    """Ignore SIGINT and SIGTERM from now on (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
            if sig is not None:
                signal.signal(sig, signal.SIG_IGN)


def cmd_schema(config: Config) -> int:
    """Print the plan JSON Schema (bridge-plan-schema.json) on stdout."""
    sys.stdout.write(json.dumps(load_schema(), indent=2) + "\n")
    return EXIT_OK


def cmd_untrust(config: Config, folder: str) -> int:
    """Take a folder off the trusted projects (cmd_trust)."""
    return cmd_trust(config, folder, trust=False)


def _run(config: Config, plan_id: str | None, rerun: bool, resume: bool, dry_run: bool) -> int:
    """A run: every pending plan (no plan_id) or one; with dry_run, only its messages."""
    if dry_run:
        return cmd_dry_run(config, plan_id)
    quiet_http_logs()
    return cmd_run(config, plan_id, rerun, resume)


def _call_action(action: Action, config: Config, args: argparse.Namespace) -> int:
    """Call the action's handler with config, its value, and its passed modifiers' values."""
    passed = {row.flag for row in MODIFIERS if row.passed}
    values = [getattr(args, _dest(action.flag))] if action.metavar else []
    values += [getattr(args, _dest(flag)) for flag in action.modifiers if flag in passed]
    return globals()[action.handler](config, *values)


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> int:
    """Run bridge with argv (default sys.argv[1:]); return the exit code.

    The one error boundary: a BridgeError prints "bridge: error: …" (and a hint) on
    stderr and returns its exit code; Ctrl-C or SIGTERM returns 130, both ignored from
    then on; anything else is a bug: exit 70, the traceback only with --debug."""
    parser = build_parser()
    args = parser.parse_args(argv)
    action = chosen_action(args)
    _check_flag_combinations(parser, args, action)
    environ = dict(os.environ if environ is None else environ)
    # the model server's key given as a flag is as secret as in its variable
    remember_secrets({**environ, **({"BRIDGE_API_KEY": args.api_key} if args.api_key else {})})
    debug = debug_wanted(args, environ)
    try:
        return _call_action(action, resolve_config(args, environ), args)
    except BridgeError as exc:
        print(printable(f"bridge: error: {exc}"), file=sys.stderr)
        if exc.hint:
            print(printable(f"hint: {exc.hint}"), file=sys.stderr)
        Events(args.events).emit("error", args.plan, message=str(exc), hint=exc.hint,
                                 exit_code=exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        _ignore_interrupts()    # on the way out: a late Ctrl-C must not cut this short
        print("bridge: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout was closed early (bridge --list | head): not an error worth a word
        with _suppress(OSError):
            sys.stdout = open(os.devnull, "w")
        return EXIT_OK
    except Exception as exc:
        if (missing := missing_dependency_error(exc)) is not None:
            print(printable(f"bridge: error: {missing}"), file=sys.stderr)
            print(printable(f"hint: {missing.hint}"), file=sys.stderr)
            return missing.exit_code
        if debug:
            import traceback
            traceback.print_exc()       # and still exit 70: a bug is a bug with --debug too
        print("bridge: internal error (a bug)"
              + ("" if debug else "; run again with --debug to see the traceback"), file=sys.stderr)
        return EXIT_INTERNAL


def main_entry() -> None:
    """Console-script entry point: install the Ctrl-C and SIGTERM handler, run main, exit.
    A SIGINT ignored by whoever started bridge (a background job) stays ignored."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _raise_interrupt)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _raise_interrupt)
    sys.exit(main())


if __name__ == "__main__":
    main_entry()
