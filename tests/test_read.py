"""The CSV reader on crafted bad input: every data row is either a record or counted, never lost."""
import io

import pytest

from medgen.data import read
from medgen.data.storage import redact
from medgen.errors import UserError

COLS = read.Columns(title="title", text="text", url="url", tags="", authors="", timestamp="")


def _batches(data: bytes, chunk_rows: int = 1000):
    return list(read.iter_batches(read.HashingReader(io.BytesIO(data)), COLS, chunk_rows, "mem://x.csv"))


def _totals(batches):
    records = [r for b in batches for r in b.records]
    malformed = sum((b.malformed for b in batches), start=type(batches[0].malformed)()) if batches else {}
    return records, dict(malformed)


def test_rows_with_wrong_field_count_or_quoting_are_counted_not_shifted():
    data = (
        b'title,text,url\n'
        b'a,"one, with comma",u1\n'
        b'b,two,u2,EXTRA\n'          # too many fields
        b'c,three\n'                 # too few
        b'd,"quoted"junk,u4\n'       # text after a closing quote
        b'\n'                        # a blank line is not a row
        b'e,"multi\nline",u5\n'
    )
    records, malformed = _totals(_batches(data))
    assert [r["title"] for r in records] == ["a", "e"]
    assert records[1]["text"] == "multi\nline"
    assert malformed == {"wrong_field_count": 2, "malformed_quoting": 1}


def test_batches_hold_at_most_chunk_rows_rows():
    data = b"title,text,url\n" + b"".join(b"t%d,x,u\n" % i for i in range(10)) + b"bad,row\n"
    batches = _batches(data, chunk_rows=3)
    assert [b.rows for b in batches] == [3, 3, 3, 2]
    assert sum(len(b.records) for b in batches) == 10


def test_bom_crlf_and_invalid_utf8_are_read():
    data = b"\xef\xbb\xbftitle,text,url\r\nt,caf\xe9 au lait,u\r\n"
    records, malformed = _totals(_batches(data))
    assert records == [{"title": "t", "text": "caf\ufffd au lait", "url": "u"}] and not malformed


@pytest.mark.parametrize("data", [b"", b"title,text,url\n"])
def test_empty_file_and_header_only_give_no_rows(data):
    assert _batches(data) == []


def test_quote_never_closed_is_a_broken_source():
    data = b"title,text,url\nt,fine,u\nt,fine,u\nt,\"opened,u\nt,fine,u\n"
    with pytest.raises(UserError, match=r"mem://x.csv: the quoted field opened at line 4 never closes"):
        _batches(data)


def test_missing_column_names_the_column_and_the_remedy():
    with pytest.raises(UserError, match=r"no column 'text' \(columns: title, body, url\); set data.<name>_column"):
        _batches(b"title,body,url\nx,y,z\n")


def test_source_hash_covers_every_byte():
    import hashlib

    data = b"title,text,url\nt,x,u\n" * 3
    reader = read.HashingReader(io.BytesIO(data))
    list(read.iter_batches(reader, COLS, 10, "mem://x.csv"))
    assert reader.bytes == len(data) and reader.sha256.hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("url,shown", [
    ("s3://bucket/raw.csv", "s3://bucket/raw.csv"),
    ("https://user:pa55@host/x.csv?X-Amz-Signature=abc", "https://host/x.csv"),
])
def test_redact_drops_credentials(url, shown):
    assert redact(url) == shown
