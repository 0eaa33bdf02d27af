"""The README's client examples, run as the programs they are against `invoisx-proxy demo`.

The section "Pointing existing clients at the proxy" is the source: each fenced block is
written out with only its port changed (PHP also gets the package loading that Composer or a
Laravel app does), run with its own runtime (Node.js, Python, PHP, Java, Mono, curl), and what
it printed is checked against the demo. Each one is also pointed straight at the sandbox, past
the proxy and so without a token, where the same check must fail. The runtimes are Debian
packages that `.ci/run` installs: a missing one fails the test, it never skips.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.config.keys import config_block
from tests.conftest import RunningProxy, Sandbox, free_port, subprocess_env

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Pointing existing clients at the proxy"
README_API = "http://127.0.0.1:8080/api/v1"
# The first word of the paragraph above each block, and the block's fence language.
LANGUAGES = {
    "JavaScript": "js",
    "Python": "python",
    "PHP": "php",
    "Laravel": "php",
    "Java": "java",
    "C#": "csharp",
    "curl": "sh",
}
# Each command and the Debian package `.ci/run` installs it from.
PACKAGES = {
    "node": "nodejs",
    "php": "php-cli",
    "java": "default-jdk-headless",
    "mcs": "mono-devel",
    "mono": "mono-devel",
    "curl": "curl",
    "sh": "dash",
}
COMPOSER_AUTOLOAD = "require 'vendor/autoload.php';"
DEBIAN_AUTOLOAD = "require 'GuzzleHttp/autoload.php';"
# What a Laravel app has done before its code runs: the packages loaded, the `Http` facade
# resolving to the client factory (the app's container binds the same class), and `$key` read
# from its configuration.
LARAVEL_SETUP = """
require 'GuzzleHttp/autoload.php';
require 'Illuminate/Http/autoload.php';
Illuminate\\Support\\Facades\\Http::swap(new Illuminate\\Http\\Client\\Factory());
$key = getenv('CLIENT_KEY');
"""
# Sent where the demo has no client keys: the proxy replaces it with the token.
NOT_A_KEY = "not-a-client-key"
CLIENT_KEY = "ipk_laravel_0123456789abcdefghijklmnopqrstuv"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
LINE = {"description": "E-invoicing consultancy", "quantity": 2, "unitPrice": 150}


@dataclass(frozen=True)
class Example:
    name: str
    language: str
    code: str


def parse_examples(text: str) -> dict[str, Example]:
    """Each fenced block of the README section, named by the paragraph just above it."""
    start = text.index(f"\n{SECTION}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    found: dict[str, Example] = {}
    block = re.compile(r"^([^\n]+(?:\n[^\n]+)*)\n```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
    for match in block.finditer(section):
        name = match[1].split()[0].rstrip(":")
        assert name not in found, f"two examples named {name!r}"
        found[name] = Example(name, match[2], match[3])
    return found


def _command(name: str) -> str:
    path = shutil.which(name)
    assert path, f"needs {name} (Debian package {PACKAGES[name]}, installed by .ci/run)"
    return path


@dataclass(frozen=True)
class Demo:
    api_url: str
    # What the proxy forwards to: a client calling it directly has no token.
    sandbox_url: str


class Runner:
    """Runs a README example against `api_url`; returns its standard output.

    An AssertionError when the program fails (exit status other than 0), with its output.
    """

    def __init__(self, examples: dict[str, Example], workdir: Path, api_url: str) -> None:
        self.examples = examples
        self.workdir = workdir
        self.api_url = api_url

    def __call__(self, name: str, **env: str) -> str:
        example = self.examples[name]
        assert README_API in example.code, f"the {name} example does not call {README_API}"
        code = example.code.replace(README_API, self.api_url)
        where = self.workdir / re.sub(r"\W", "_", name)
        where.mkdir(exist_ok=True)
        steps = getattr(self, f"_{example.language}")(code, where)
        # A developer's HTTP proxy must not carry the loopback calls.
        inherited = {k: v for k, v in subprocess_env().items() if not k.lower().endswith("_proxy")}
        for step in steps:
            run = subprocess.run(
                step, cwd=where, env=inherited | env, capture_output=True, text=True, timeout=120
            )
            assert run.returncode == 0, f"{name}: {step} exited {run.returncode}:\n{run.stderr}"
        return run.stdout

    @staticmethod
    def _write(path: Path, code: str) -> str:
        path.write_text(code)
        return str(path)

    def _js(self, code: str, where: Path) -> list[list[str]]:
        # .mjs: an ES module, where top-level await is allowed.
        return [[_command("node"), self._write(where / "example.mjs", code)]]

    def _python(self, code: str, where: Path) -> list[list[str]]:
        return [[sys.executable, self._write(where / "example.py", code)]]

    def _php(self, code: str, where: Path) -> list[list[str]]:
        if "Http::" in code:
            program = f"<?php\n{LARAVEL_SETUP}\n{code}"
        else:
            assert COMPOSER_AUTOLOAD in code, "the Guzzle example loads Composer's autoloader"
            program = "<?php\n" + code.replace(COMPOSER_AUTOLOAD, DEBIAN_AUTOLOAD)
        return [[_command("php"), self._write(where / "example.php", program)]]

    def _java(self, code: str, where: Path) -> list[list[str]]:
        found = re.search(r"public class (\w+)", code)
        assert found, "the Java example declares a public class"
        # Java 11's source launcher: compiled in memory and run, as the README says.
        return [[_command("java"), self._write(where / f"{found[1]}.java", code)]]

    def _csharp(self, code: str, where: Path) -> list[list[str]]:
        source = self._write(where / "Example.cs", code)
        compile_ = [_command("mcs"), "-r:System.Net.Http.dll", "-out:Example.exe", source]
        return [compile_, [_command("mono"), str(where / "Example.exe")]]

    def _sh(self, code: str, where: Path) -> list[list[str]]:
        _command("curl")
        return [[_command("sh"), self._write(where / "example.sh", code)]]


@pytest.fixture(scope="module")
def examples() -> dict[str, Example]:
    return parse_examples(README.read_text())


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """`invoisx-proxy demo` as a process, shared by the module's tests."""
    port = free_port()
    output = tmp_path_factory.mktemp("demo") / "demo.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "demo", "--port", str(port)],
            env=subprocess_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while "Ctrl-C stops the demo." not in (text := output.read_text()):
            assert process.poll() is None, f"the demo exited:\n{text}"
            assert time.monotonic() < deadline, f"the demo did not start:\n{text}"
            time.sleep(0.05)
        startup = json.loads(next(line for line in text.splitlines() if '"startup"' in line))
        yield Demo(f"http://127.0.0.1:{port}/api/v1", startup["upstream"])
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _data(response: httpx.Response) -> Any:
    assert response.is_success, response.text
    return response.json()["data"]


def _create_buyer(demo: Demo, name: str) -> str:
    body = {"name": name, "tin": "C2584563200"}
    return str(_data(httpx.post(f"{demo.api_url}/buyers", json=body))["id"])


def _create_invoice(demo: Demo, buyer: str, *, validate: bool = False) -> str:
    body = {"buyerId": buyer, "invoiceLines": [LINE]}
    invoice = str(_data(httpx.post(f"{demo.api_url}/invoices", json=body))["id"])
    if validate:
        _data(httpx.post(f"{demo.api_url}/invoices/{invoice}/validate"))
    return invoice


def _buyers(demo: Demo, **query: str) -> dict[str, Any]:
    response = httpx.get(f"{demo.api_url}/buyers", params=query)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise AssertionError(f"not JSON: {text[:300]!r}") from None


def _json_documents(text: str) -> list[Any]:
    """The JSON documents printed one after the other (curl adds no newline)."""
    decoder, documents, at = json.JSONDecoder(), [], 0
    while at < len(text):
        try:
            document, at = decoder.raw_decode(text, at)
        except ValueError:
            raise AssertionError(f"not JSON at {at}: {text[at : at + 300]!r}") from None
        documents.append(document)
    return documents


def _assert_created_buyer(demo: Demo, printed: str) -> None:
    assert UUID.fullmatch(printed), printed
    assert _data(httpx.get(f"{demo.api_url}/buyers/{printed}"))["name"] == "Acme Sdn Bhd"


def _javascript(run: Runner, demo: Demo) -> None:
    seeded = _create_buyer(demo, "Acme Trading Sdn Bhd")
    lines = run("JavaScript").splitlines()
    page = _buyers(demo, search="acme")
    assert f"{seeded} Acme Trading Sdn Bhd" in lines
    listed = [f"{buyer['id']} {buyer['name']}" for buyer in page["data"]]
    assert lines == [f"{page['meta']['total']} buyers", *listed]


def _python(run: Runner, demo: Demo) -> None:
    _assert_created_buyer(demo, run("Python").strip())


def _php(run: Runner, demo: Demo) -> None:
    buyer = _create_buyer(demo, "Guzzle Trading Sdn Bhd")
    draft = _create_invoice(demo, buyer)
    ready = _create_invoice(demo, buyer, validate=True)
    lines = run("PHP").splitlines()
    assert f"{draft} draft" in lines
    # The status filter reached InvoisX.
    assert all(line.endswith(" draft") for line in lines), lines
    assert not any(line.startswith(ready) for line in lines)


def _laravel(run: Runner, demo: Demo) -> None:
    _assert_created_buyer(demo, run("Laravel", CLIENT_KEY=NOT_A_KEY).strip())


def _java(run: Runner, demo: Demo) -> None:
    status, _, body = run("Java").strip().partition(" ")
    assert status == "201", status + body
    _assert_created_buyer(demo, _json(body)["data"]["id"])


def _csharp(run: Runner, demo: Demo) -> None:
    seeded = _create_buyer(demo, "Acme Sharp Sdn Bhd")
    listed = _json(run("C#"))
    assert listed["success"] is True
    assert seeded in [buyer["id"] for buyer in listed["data"]]
    assert listed == _buyers(demo, search="acme")


def _curl(run: Runner, demo: Demo) -> None:
    invoice = _create_invoice(demo, _create_buyer(demo, "Curl Trading Sdn Bhd"), validate=True)
    listing, submitted = _json_documents(run("curl", ID=invoice))
    assert listing["success"] is True
    assert listing["meta"]["total"] == _buyers(demo)["meta"]["total"]
    assert (submitted["data"]["id"], submitted["data"]["status"]) == (invoice, "valid")


# Each client's check: it calls `run` with the client's name and asserts on what it printed.
CHECKS: dict[str, Callable[[Runner, Demo], None]] = {
    "JavaScript": _javascript,
    "Python": _python,
    "PHP": _php,
    "Laravel": _laravel,
    "Java": _java,
    "C#": _csharp,
    "curl": _curl,
}


def test_the_section_shows_each_client_once(examples: dict[str, Example]) -> None:
    assert {name: example.language for name, example in examples.items()} == LANGUAGES
    assert set(CHECKS) == set(LANGUAGES)


@pytest.mark.parametrize("name", CHECKS)
def test_the_example_works_through_the_demo(
    name: str, examples: dict[str, Example], demo: Demo, tmp_path: Path
) -> None:
    CHECKS[name](Runner(examples, tmp_path, demo.api_url), demo)


@pytest.mark.parametrize("name", CHECKS)
def test_the_example_fails_when_it_skips_the_proxy(
    name: str, examples: dict[str, Example], demo: Demo, tmp_path: Path
) -> None:
    """The same check, with the example calling the sandbox itself: it has no token there."""
    with pytest.raises(AssertionError) as failed:
        CHECKS[name](Runner(examples, tmp_path, demo.sandbox_url), demo)
    # Failed on what the sandbox answered, not on a missing runtime or an example gone astray.
    assert "needs " not in str(failed.value) and README_API not in str(failed.value)


def test_laravel_sends_the_app_key_where_the_token_was(
    examples: dict[str, Example],
    tmp_path: Path,
    start_sandbox_upstream: Callable[..., Sandbox],
    start_proxy: Callable[..., RunningProxy],
) -> None:
    sandbox = start_sandbox_upstream(rate_limit_per_minute=0)
    config = tmp_path / "proxy.toml"
    config.write_text(config_block("laravel-app", CLIENT_KEY, ["read", "create"]))
    proxy = start_proxy(sandbox.url, api_token=sandbox.token.value, config=config)
    run = Runner(examples, tmp_path, f"{proxy.url}/api/v1")
    printed = run("Laravel", CLIENT_KEY=CLIENT_KEY).strip()
    assert UUID.fullmatch(printed), printed
    assert proxy.last_audit()["client"] == "laravel-app"
    with pytest.raises(AssertionError, match="401"):
        run("Laravel", CLIENT_KEY=NOT_A_KEY)
