"""transfer.py's hand-made ObjectChunk encoding: valid protobuf both ways, data never copied."""
from __future__ import annotations

import pytest

from meshray.node.transfer import decode_chunk, encode_chunk
from meshray.rpc.generated import meshray_pb2 as pb


@pytest.mark.parametrize("offset,total", [(0, 48), (127, 128), (2 ** 35 + 3, 2 ** 40)])
def test_encoded_chunks_parse_as_object_chunks(offset, total):
    data = bytes(range(256)) * 3
    chunk = pb.ObjectChunk.FromString(encode_chunk(offset, memoryview(data), total))
    assert (chunk.offset, chunk.data, chunk.total_size) == (offset, data, total)


def test_protobuf_encoded_chunks_decode_in_any_field_order():
    message = pb.ObjectChunk(offset=4096, data=b"xyz", total_size=9000).SerializeToString()
    offset, data, total = decode_chunk(message)
    assert (offset, bytes(data), total) == (4096, b"xyz", 9000)
    assert decode_chunk(encode_chunk(7, b"abc", 10))[0] == 7


def test_decoded_data_is_a_view_of_the_message():
    message = encode_chunk(0, b"\1" * 1000, 1000)
    _offset, data, _total = decode_chunk(message)
    assert isinstance(data, memoryview) and data.obj is message


def test_unknown_fields_are_skipped():
    extra = b"\x20\x05" + b"\x2d\0\0\0\0" + b"\x31" + b"\0" * 8 + b"\x3a\x02hi"
    offset, data, total = decode_chunk(encode_chunk(3, b"ok", 5) + extra)
    assert (offset, bytes(data), total) == (3, b"ok", 5)


@pytest.mark.parametrize("message", [
    b"\x08",                        # varint cut short
    b"\x12\x05abc",                 # data longer than the message
    b"\x0b",                        # group wire type
    b"\x08" + b"\xff" * 11,         # overlong varint
])
def test_malformed_messages_are_refused(message):
    with pytest.raises(ValueError):
        decode_chunk(message)


def test_an_empty_message_is_an_empty_chunk():
    offset, data, total = decode_chunk(b"")
    assert (offset, bytes(data), total) == (0, b"", 0)
