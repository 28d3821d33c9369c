"""Streaming JSON input for QMP, with QEMU's framing and error semantics.

Theory of operation
-------------------
QMP input is a byte stream of JSON values, not lines: a chunk may hold several values,
a value may be split at any byte, and nothing terminates a value but its own syntax.
:class:`JSONStream` turns the stream into a sequence of items, each either a parsed
:class:`Message` or a :class:`ParseError`, exactly as QEMU's JSON layer would
(docs/qemu-behaviour/qmp-protocol.md §7; ``qemu/qemu: qobject/json-lexer.c``, ``json-streamer.c``,
``json-parser.c``):

* **Lexer.** A state machine over bytes mirroring QEMU's table: strings in double *or*
  single quotes (``\\'`` is an escape in both), numbers without leading zeros, keywords
  ``[a-z]+``, the six structural characters, whitespace. A byte no state accepts is a
  lexical error, ``JSON parse error, stray '<token so far>'``; the lexer then drops the
  current message and skips input until ``[ ] { } : ,``, a control character other than
  TAB, or a 0xFE/0xFF byte (the resync rule), which starts afresh. States with self-loops
  (string bodies, digit runs, keywords, whitespace, recovery) advance with one regex
  match, so long tokens cost C time, not a Python loop per byte.
* **Streamer.** Counts ``{``/``[`` nesting per message; a message is complete when both
  counts are back to zero (or one goes negative). Before each token it enforces QEMU's
  limits: 64 MiB of token text per message, 2 Mi tokens, nesting 1024; passing one is an
  error and resets the message. A single unterminated token is cut at 64 MiB, so memory
  stays bounded whatever arrives.
* **Parser.** A push parser fed token by token that builds the value as it goes (no
  token list is kept). It records the *first* syntax error, as QEMU's recursive-descent
  parser does, and reports it when the message completes; a lexical error or a limit
  before completion replaces it, as in QEMU (the tokens are dropped).
* **Fast path.** When the stream is between messages and a value starts with ``{``,
  ``json.JSONDecoder.raw_decode`` (C speed) tries to parse it whole. Its result is used
  only when QEMU would produce the same: no ``\\u`` escapes, no non-characters, no
  NaN/Infinity, no duplicate keys, nesting and size far below the limits; anything else
  falls back to the lexer path, which is authoritative. A value cut short at the end of
  the buffer is held (up to :data:`FAST_HOLD_LIMIT` bytes) until more data arrives.

Values: objects are ``dict`` (members in input order), arrays ``list``, strings ``str``
(``\\u0000`` and the bytes C0 80 both give U+0000, as in QEMU's modified UTF-8),
integers ``int`` when they fit int64 or uint64 and ``float`` otherwise, as QEMU's QNum.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "FAST_HOLD_LIMIT",
    "MAX_NESTING",
    "MAX_TOKEN_COUNT",
    "MAX_TOKEN_SIZE",
    "JSONStream",
    "Message",
    "ParseError",
]

MAX_TOKEN_SIZE: Final = 64 << 20
MAX_TOKEN_COUNT: Final = 2 << 20
MAX_NESTING: Final = 1 << 10
#: Bytes of an unfinished value the fast path may hold back waiting for its end.
FAST_HOLD_LIMIT: Final = 1 << 20
_FAST_WINDOW: Final = 4096
_FAST_MAX: Final = 2 << 20  # far below every limit: <= 2 Mi bytes means <= 2 Mi tokens


@dataclass(frozen=True, slots=True)
class Message:
    """One complete JSON value from the stream (any JSON type, not only objects)."""

    value: Any


@dataclass(frozen=True, slots=True)
class ParseError:
    """A lexical, syntax or limit error; ``desc`` is QEMU's text (GenericError, no id)."""

    desc: str


# --- lexer tables ------------------------------------------------------------------------
# Lexer states (as json-lexer.c).
(
    _START,
    _RECOVERY,
    _DQ,
    _DQ_ESC,
    _SQ,
    _SQ_ESC,
    _ZERO,
    _SIGN,
    _DIGITS,
    _MANTISSA,
    _MANTISSA_DIGITS,
    _EXP_E,
    _EXP_SIGN,
    _EXP_DIGITS,
    _KEYWORD,
) = range(15)
# Token types.
(
    _LCURLY,
    _RCURLY,
    _LSQUARE,
    _RSQUARE,
    _COMMA,
    _COLON,
    _INTEGER,
    _FLOAT,
    _KW,
    _STRING,
) = range(20, 30)
_ERROR: Final = 40
_LOOKAHEAD: Final = 0x80  # flag: the byte ends the token but is not part of it


def _build_table() -> list[list[int]]:
    table = [[_ERROR] * 256 for _ in range(15)]

    def put(state: int, chars: bytes | range, target: int) -> None:
        for c in chars:
            table[state][c] = target

    digits = b"0123456789"
    put(_RECOVERY, range(0x20, 0xFE), _RECOVERY)
    put(_RECOVERY, range(0x00, 0x20), _START | _LOOKAHEAD)
    put(_RECOVERY, b"\t", _RECOVERY)
    put(_RECOVERY, b"\xfe\xff[]{}:,", _START | _LOOKAHEAD)
    for body, esc, quote in ((_DQ, _DQ_ESC, b'"'), (_SQ, _SQ_ESC, b"'")):
        put(esc, range(0x20, 0xFE), body)  # escapes are checked by the parser
        put(body, range(0x20, 0xFE), body)
        put(body, b"\\", esc)
        put(body, quote, _STRING)
    for state, token in (
        (_ZERO, _INTEGER),
        (_DIGITS, _INTEGER),
        (_MANTISSA_DIGITS, _FLOAT),
        (_EXP_DIGITS, _FLOAT),
        (_KEYWORD, _KW),
    ):
        put(state, range(256), token | _LOOKAHEAD)
    put(_ZERO, digits, _ERROR)
    put(_ZERO, b".", _MANTISSA)
    put(_DIGITS, digits, _DIGITS)
    put(_DIGITS, b"eE", _EXP_E)
    put(_DIGITS, b".", _MANTISSA)
    put(_SIGN, b"0", _ZERO)
    put(_SIGN, b"123456789", _DIGITS)
    put(_MANTISSA, digits, _MANTISSA_DIGITS)
    put(_MANTISSA_DIGITS, digits, _MANTISSA_DIGITS)
    put(_MANTISSA_DIGITS, b"eE", _EXP_E)
    put(_EXP_E, b"+-", _EXP_SIGN)
    put(_EXP_E, digits, _EXP_DIGITS)
    put(_EXP_SIGN, digits, _EXP_DIGITS)
    put(_EXP_DIGITS, digits, _EXP_DIGITS)
    put(_KEYWORD, b"abcdefghijklmnopqrstuvwxyz", _KEYWORD)
    put(_START, b'"', _DQ)
    put(_START, b"'", _SQ)
    put(_START, b"0", _ZERO)
    put(_START, b"123456789", _DIGITS)
    put(_START, b"-", _SIGN)
    put(_START, b"abcdefghijklmnopqrstuvwxyz", _KEYWORD)
    put(_START, b" \t\r\n", _START)
    structural = (_LCURLY, _RCURLY, _LSQUARE, _RSQUARE, _COMMA, _COLON)
    for char, token in zip(b"{}[],:", structural, strict=True):
        table[_START][char] = token
    return table


_TABLE: Final = _build_table()
# Self-loops advanced in one match; None where a state has none worth a regex.
_RUNS: Final[list[re.Pattern[bytes] | None]] = [None] * 15
_RUNS[_START] = re.compile(rb"[ \t\r\n]+")
_RUNS[_RECOVERY] = re.compile(rb"[^\x00-\x08\x0a-\x1f\[\]{}:,\xfe\xff]+")
_RUNS[_DQ] = re.compile(rb'[^"\\\x00-\x1f\xfe\xff]+')
_RUNS[_SQ] = re.compile(rb"[^'\\\x00-\x1f\xfe\xff]+")
_RUNS[_DIGITS] = _RUNS[_MANTISSA_DIGITS] = _RUNS[_EXP_DIGITS] = re.compile(rb"[0-9]+")
_RUNS[_KEYWORD] = re.compile(rb"[a-z]+")
_WHITESPACE: Final = re.compile(rb"[ \t\r\n]+")

# Code points QEMU refuses in strings (util/unicode.c): non-characters.
_NONCHARS: Final = re.compile(
    "[\ufdd0-\ufdef"
    + "".join(f"{chr(p << 16 | 0xFFFE)}{chr(p << 16 | 0xFFFF)}" for p in range(17))
    + "]"
)
_ESCAPES: Final = {
    ord('"'): '"',
    ord("'"): "'",
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}
_HEX4: Final = re.compile(rb"[0-9a-fA-F]{4}")


class _SyntaxError(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _valid_codepoint(cp: int) -> bool:
    # reference: is_valid_codepoint() in util/unicode.c
    return (
        0 <= cp <= 0x10FFFF
        and not 0xFDD0 <= cp <= 0xFDEF
        and (cp & 0xFFFE) != 0xFFFE
        and not 0xD800 <= cp <= 0xDFFF
    )


def _decode_raw(raw: bytes) -> str:
    """Strictly decode string bytes (no escapes), QEMU style: C0 80 is U+0000."""
    try:
        if b"\xc0\x80" in raw:
            text = "\0".join(part.decode() for part in raw.split(b"\xc0\x80"))
        else:
            text = raw.decode()
    except UnicodeDecodeError:
        raise _SyntaxError("invalid UTF-8 sequence in string") from None
    if not text.isascii() and _NONCHARS.search(text):
        raise _SyntaxError("invalid UTF-8 sequence in string")
    return text


_MIN_CP: Final = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)


def _mod_utf8_codepoint(raw: bytes, i: int) -> tuple[int, int]:
    """The code point at ``raw[i]`` (-1 if invalid) and where the next one starts."""
    # reference: mod_utf8_codepoint() in util/unicode.c
    byte = raw[i]
    if byte < 0x80:
        return byte, i + 1
    if byte >= 0xFE or not byte & 0x40:
        return -1, i + 1
    length = 2
    while byte & (0x80 >> length):
        length += 1
    cp = byte & ((0x80 >> length) - 1)
    end = i + 1
    for _ in range(1, length):
        if end >= len(raw) or raw[end] & 0xC0 != 0x80:
            return -1, end
        cp = cp << 6 | raw[end] & 0x3F
        end += 1
    if not _valid_codepoint(cp) or (cp < _MIN_CP[length - 2] and not (cp == 0 and length == 2)):
        return -1, end
    return cp, end


def _qemu_replace(exc: UnicodeError) -> tuple[str, int]:
    assert isinstance(exc, UnicodeDecodeError)
    cp, end = _mod_utf8_codepoint(exc.object, exc.start)
    return ("\ufffd" if cp < 0 else chr(cp)), end


codecs.register_error("blockd-qemu-text", _qemu_replace)


def as_qemu_prints(raw: bytes) -> str:
    """The text QEMU shows for raw input bytes quoted in an error message.

    The bytes end at the first NUL (they are a C string); C0 80 is U+0000 (modified
    UTF-8); every invalid sequence and every non-character becomes one U+FFFD, as
    ``to_json()`` in ``qobject/qjson.c`` prints them.
    """
    text = raw.split(b"\0")[0].decode("utf-8", "blockd-qemu-text")
    return _NONCHARS.sub("\ufffd", text) if not text.isascii() else text


def _hex4(token: bytes, at: int) -> int:
    return int(token[at : at + 4], 16) if _HEX4.fullmatch(token, at, at + 4) else -1


def decode_string(token: bytes) -> str:
    """The value of a string token (quotes included), as QEMU's ``parse_string``.

    Raises:
        _SyntaxError: the first invalid escape, \\u sequence or UTF-8 sequence.
    """
    body = token[1:-1]
    if b"\\" not in body:
        return _decode_raw(body)
    parts: list[str] = []
    end = len(token) - 1
    i = 1
    while i < end:
        j = token.find(b"\\", i, end)
        if j < 0:
            j = end
        if j > i:
            parts.append(_decode_raw(token[i:j]))
        if j == end:
            break
        code = token[j + 1]
        if code != ord("u"):
            char = _ESCAPES.get(code)
            if char is None:
                raise _SyntaxError("invalid escape sequence in string")
            parts.append(char)
            i = j + 2
            continue
        # reference: the 'u' case of parse_string() in qobject/json-parser.c
        cp = _hex4(token, j + 2)
        i = j + 6
        if 0xD800 <= cp <= 0xDBFF and token[i : i + 2] == b"\\u":
            low = _hex4(token, i + 2)
            if 0xDC00 <= low <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) + (low & 0x3FF)
                i += 6
            else:
                cp = -1
        if not _valid_codepoint(cp):
            text = as_qemu_prints(token[j:i])
            raise _SyntaxError(f"{text} is not a valid Unicode character")
        parts.append(chr(cp))
    return "".join(parts)


def _integer(text: bytes | str) -> int | float:
    # reference: JSON_INTEGER in parse_literal(): int64, else uint64, else double
    if len(text) > 21:
        return float(text)
    value = int(text)
    if -(1 << 63) <= value < (1 << 64):
        return value
    return float(text)


_KEYWORDS: Final[dict[bytes, Any]] = {b"true": True, b"false": False, b"null": None}


# --- push parser -------------------------------------------------------------------------
# Frame states: what the container expects next.
_A_FIRST, _A_VALUE, _A_SEP, _O_FIRST, _O_KEY, _O_COLON, _O_VALUE, _O_SEP = range(8)


class _Frame:
    __slots__ = ("container", "key", "state")

    def __init__(self, container: dict[str, Any] | list[Any], state: int) -> None:
        self.container = container
        self.state = state
        self.key = ""


class _Parser:
    """Builds one value from tokens; keeps the first syntax error (json-parser.c)."""

    def __init__(self) -> None:
        self.stack: list[_Frame] = []
        self.error: str | None = None
        self.done = False
        self.result: Any = None

    def push(self, kind: int, text: bytes) -> None:
        if self.error is not None:
            return
        try:
            self._push(kind, text)
        except _SyntaxError as exc:
            self.error = exc.detail

    def _push(self, kind: int, text: bytes) -> None:
        frame = self.stack[-1] if self.stack else None
        if frame is not None:
            state = frame.state
            if state in (_A_SEP, _O_SEP):
                if kind == (_RSQUARE if state == _A_SEP else _RCURLY):
                    self._value(self.stack.pop().container)
                elif kind == _COMMA:
                    frame.state = _A_VALUE if state == _A_SEP else _O_KEY
                else:
                    sep = "list" if state == _A_SEP else "dict"
                    raise _SyntaxError(f"expected separator in {sep}")
                return
            if state == _O_COLON:
                if kind != _COLON:
                    raise _SyntaxError("missing : in object pair")
                frame.state = _O_VALUE
                return
            if state in (_A_FIRST, _O_FIRST):
                if kind == (_RSQUARE if state == _A_FIRST else _RCURLY):
                    self._value(self.stack.pop().container)
                    return
                frame.state = _A_VALUE if state == _A_FIRST else _O_KEY
        # A value is expected here.
        if kind == _STRING:
            self._value(decode_string(text))
        elif kind == _LCURLY:
            self.stack.append(_Frame({}, _O_FIRST))
        elif kind == _LSQUARE:
            self.stack.append(_Frame([], _A_FIRST))
        elif kind == _INTEGER:
            self._value(_integer(text))
        elif kind == _FLOAT:
            self._value(float(text))
        elif kind == _KW:
            if text not in _KEYWORDS:
                raise _SyntaxError(f"invalid keyword '{text.decode()}'")
            self._value(_KEYWORDS[text])
        else:
            raise _SyntaxError("expecting value")

    def _value(self, value: Any) -> None:
        if not self.stack:
            self.done = True
            self.result = value
            return
        frame = self.stack[-1]
        if frame.state == _A_VALUE:
            frame.container.append(value)  # type: ignore[union-attr]
            frame.state = _A_SEP
        elif frame.state == _O_KEY:
            if type(value) is not str:
                raise _SyntaxError("key is not a string in object")
            frame.key = value
            frame.state = _O_COLON
        else:  # _O_VALUE
            container: dict[str, Any] = frame.container  # type: ignore[assignment]
            if frame.key in container:
                raise _SyntaxError("duplicate key")
            container[frame.key] = value
            frame.state = _O_SEP


# --- fast path ---------------------------------------------------------------------------
class _Fallback(Exception):
    """The fast path cannot decide this value the way QEMU would."""


def _no_constants(name: str) -> Any:
    raise _Fallback


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _Fallback
    return result


_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_unique_pairs, parse_int=_integer, parse_constant=_no_constants
)
_HOLD: Final = object()


# --- the stream --------------------------------------------------------------------------
class JSONStream:
    """QMP input framing: bytes in, :class:`Message`/:class:`ParseError` out.

    Feed bytes with :meth:`feed` and take items with :meth:`next` until it returns None.
    The guarantees of the module docstring hold for any split of the input into chunks:
    the items are the same as for the whole input fed at once.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._state = _START
        self._token = bytearray()
        self._parser = _Parser()
        self._braces = 0
        self._brackets = 0
        self._ntokens = 0
        self._size = 0
        self._out: list[Message | ParseError] = []

    def feed(self, data: bytes) -> None:
        """Append input bytes; they are parsed lazily by :meth:`next`."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next(self) -> Message | ParseError | None:
        """The next complete item, or None when more input is needed.

        None means every byte fed so far has been consumed (at most
        :data:`FAST_HOLD_LIMIT` bytes of one unfinished value may be held).
        """
        while not self._out:
            if self._idle():
                match = _WHITESPACE.match(self._buf, self._pos)
                if match:
                    self._pos = match.end()
                if self._pos < len(self._buf) and self._buf[self._pos] == ord("{"):
                    result = self._try_fast()
                    if result is _HOLD:
                        return None
                    if result is not None:
                        return result  # type: ignore[return-value]
            if self._pos >= len(self._buf):
                self._buf.clear()
                self._pos = 0
                return None
            self._lex()
        return self._out.pop(0)

    def _idle(self) -> bool:
        return self._state == _START and not self._ntokens and not self._token

    # The fast path: a whole object at once through the C decoder.
    def _try_fast(self) -> Message | object | None:
        available = len(self._buf) - self._pos
        window = _FAST_WINDOW
        while True:
            chunk = self._buf[self._pos : self._pos + min(window, _FAST_MAX)]
            cut = ""  # why the text ends before the chunk: a bad or a truncated sequence
            try:
                text = chunk.decode()
            except UnicodeDecodeError as exc:
                text = chunk[: exc.start].decode()
                cut = exc.reason
            try:
                value, end = _DECODER.raw_decode(text)
            except _Fallback:
                return None
            except (json.JSONDecodeError, RecursionError) as exc:
                in_string = isinstance(exc, json.JSONDecodeError) and exc.msg.startswith(
                    "Unterminated string"
                )
                at_end = in_string or (
                    isinstance(exc, json.JSONDecodeError) and exc.pos >= len(text)
                )
                # Only a UTF-8 sequence cut by the end of the data, inside a string, may
                # be completed later; anywhere else QEMU's lexer rejects the byte at once.
                if not at_end or (cut and not (cut == "unexpected end of data" and in_string)):
                    return None
                if len(chunk) < available:
                    if window >= _FAST_MAX:
                        return None
                    window *= 4
                    continue
                return _HOLD if available < FAST_HOLD_LIMIT else None
            consumed = text[:end]
            nbytes = end if consumed.isascii() else len(consumed.encode())
            if (
                "\\u" in consumed
                or (nbytes != end and _NONCHARS.search(consumed))
                or consumed.count("{") + consumed.count("[") > MAX_NESTING
            ):
                return None
            self._pos += nbytes
            return Message(value)

    # The authoritative path: QEMU's lexer, streamer and parser.
    def _lex(self) -> None:
        """Consume input until an item is produced or the buffer is exhausted."""
        buf = self._buf
        n = len(buf)
        pos = self._pos
        token = self._token
        state = self._state
        out = self._out
        while pos < n and not out:
            run = _RUNS[state]
            if run is not None:
                if state <= _RECOVERY:  # whitespace, recovery: skipped, not kept
                    match = run.match(buf, pos)
                    if match:
                        pos = match.end()
                        continue
                else:
                    room = MAX_TOKEN_SIZE + 1 - len(token)
                    match = run.match(buf, pos, min(n, pos + room))
                    if match:
                        token += buf[pos : match.end()]
                        pos = match.end()
                        if len(token) > MAX_TOKEN_SIZE:
                            self._limit("JSON token size limit exceeded")
                            token.clear()
                            state = _START
                        continue
            char = buf[pos]
            target = _TABLE[state][char]
            if target & _LOOKAHEAD:
                target &= ~_LOOKAHEAD
                if target != _START:
                    self._emit(target, bytes(token))
                token.clear()
                state = _START
                continue
            pos += 1
            if target == _START:  # whitespace between tokens
                continue
            token.append(char)
            if target == _ERROR:
                stray = as_qemu_prints(bytes(token))
                self._limit(f"JSON parse error, stray '{stray}'")
                token.clear()
                state = _RECOVERY
            elif target >= _LCURLY:
                self._emit(target, bytes(token))
                token.clear()
                state = _START
            else:
                state = target
                if len(token) > MAX_TOKEN_SIZE:
                    self._limit("JSON token size limit exceeded")
                    token.clear()
                    state = _START
        self._pos = pos
        self._state = state

    def _emit(self, kind: int, text: bytes) -> None:
        # reference: json_message_process_token() in qobject/json-streamer.c
        if kind == _LCURLY:
            self._braces += 1
        elif kind == _RCURLY:
            self._braces -= 1
        elif kind == _LSQUARE:
            self._brackets += 1
        elif kind == _RSQUARE:
            self._brackets -= 1
        if self._size + len(text) + 1 > MAX_TOKEN_SIZE:
            self._limit("JSON token size limit exceeded")
            return
        if self._ntokens + 1 > MAX_TOKEN_COUNT:
            self._limit("JSON token count limit exceeded")
            return
        if self._braces + self._brackets > MAX_NESTING:
            self._limit("JSON nesting depth limit exceeded")
            return
        self._size += len(text)
        self._ntokens += 1
        self._parser.push(kind, text)
        if (self._braces > 0 or self._brackets > 0) and self._braces >= 0 and self._brackets >= 0:
            return
        parser = self._parser
        if parser.error is not None:
            self._limit(f"JSON parse error, {parser.error}")
        elif not parser.done:
            self._limit("JSON parse error, premature EOI")
        else:
            self._out.append(Message(parser.result))
            self._reset()

    def _limit(self, desc: str) -> None:
        """Report an error and drop the current message."""
        self._out.append(ParseError(desc))
        self._reset()

    def _reset(self) -> None:
        self._braces = self._brackets = self._ntokens = self._size = 0
        self._parser = _Parser()
