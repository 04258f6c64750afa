"""Stands in for ``powershell.exe`` the way vmvault calls it, strictly.

* Only ``-NoProfile -NonInteractive -EncodedCommand BASE64`` is accepted. ``-Command -``
  (a script on stdin) is refused: the real one reads stdin statement by statement like a
  prompt, which cuts multi-line blocks, so vmvault must never use it.
* The argument must be base64 of UTF-16LE text, as ``-EncodedCommand`` requires; anything
  else fails the way PowerShell does (exit 1, message on stderr).
* The script is parsed with tree-sitter-powershell; a syntax error fails it.
* The step is recognised by its script text and its parameters are decoded from the base64
  JSON literal and checked against the step table. Then, by ``FAKE_PS_MODE``:
  ``lab`` answers with the lab host at ``FAKE_PS_LAB`` (``vmvault.testing``), printing the
  reply line in UTF-8 after a line of noise; ``sleep`` hangs; ``fail`` exits 1;
  ``latin1`` prints output that is not UTF-8.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import sys
import time


def fail(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.exit(1)


def main() -> None:
    args = sys.argv[1:]
    if "-Command" in args or "-File" in args:
        fail("fake powershell.exe: only -EncodedCommand is supported (stdin scripts are cut statement by statement)")
    if len(args) != 4 or args[:3] != ["-NoProfile", "-NonInteractive", "-EncodedCommand"]:
        fail(f"fake powershell.exe: unexpected arguments {args[:3]!r}")
    try:
        raw = base64.b64decode(args[3], validate=True)
        if len(raw) % 2:
            raise ValueError("odd length")
        text = raw.decode("utf-16-le")
    except (binascii.Error, ValueError):
        fail(
            "Cannot process the command because the value specified with -EncodedCommand is not properly "
            "encoded. The value must be Base64 encoded."
        )
    import tree_sitter
    import tree_sitter_powershell

    tree = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language())).parse(text.encode("utf-8"))
    if tree.root_node.has_error:
        fail("ParserError: the script has a syntax error")

    from vmvault.hypervisors.hyperv.scripts import script
    from vmvault.hypervisors.hyperv.steps import STEPS

    steps = [s for s in STEPS if "& {\n" + script(s) + "\n} @vmvaultArgs" in text]
    if len(steps) != 1:
        fail("fake powershell.exe: not one of vmvault's step scripts")
    step = steps[0]
    payload = re.findall(r"FromBase64String\('([A-Za-z0-9+/=]*)'\)", text)
    if len(payload) != 1:
        fail("fake powershell.exe: no parameter literal")
    params = json.loads(base64.b64decode(payload[0], validate=True).decode("utf-8"))
    if set(params) != set(STEPS[step]) or any(type(params[k]) is not t for k, t in STEPS[step].items()):
        fail(f"fake powershell.exe: parameters {params!r} do not match step {step}")

    mode = os.environ.get("FAKE_PS_MODE", "lab")
    if mode == "sleep":
        time.sleep(60)
    if mode == "fail":
        fail("powershell: Access is denied (0x80070005)")
    if mode == "latin1":
        sys.stdout.buffer.write('{"ok":true,"result":{"name":"w\xe9b"}}'.encode("latin-1"))
        return

    from vmvault.errors import VmvaultError
    from vmvault.testing.hyperv_lab import LabHost, LabTransport

    try:
        result = LabTransport(LabHost(os.environ["FAKE_PS_LAB"])).run(step, params, 60)
        out = {"ok": True, "result": result}
    except VmvaultError as exc:
        out = {"ok": False, "error": {"message": str(exc), "type": type(exc).__name__}}
    line = json.dumps(out, ensure_ascii=False, separators=(",", ":"))
    sys.stdout.buffer.write(("WARNING: a line of noise before the reply\r\n" + line + "\r\n").encode("utf-8"))


if __name__ == "__main__":
    main()
