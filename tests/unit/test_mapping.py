"""message_to_dict on real Telethon TL objects built without a client."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from telethon.tl import types

from worker.mapping import media_kind, message_to_dict

WHEN = datetime(2025, 11, 7, 10, 23, 45, tzinfo=UTC)
PEER = types.PeerChannel(1234567890)
BASE_KEYS = [
    "id",
    "date",
    "from_id",
    "chat",
    "text",
    "reply_to",
    "views",
    "forwards",
    "replies_count",
    "entities",
]


def _message(**fields: object) -> types.Message:
    defaults: dict[str, object] = {"id": 123, "peer_id": PEER, "date": WHEN, "message": "hello"}
    defaults.update(fields)
    return types.Message(**defaults)


def test_plain_message_has_the_seed_schema_in_fixed_order() -> None:
    out = message_to_dict(_message(), "@ru_python")
    assert list(out) == BASE_KEYS
    assert out == {
        "id": 123,
        "date": "2025-11-07T10:23:45Z",
        "from_id": None,
        "chat": "@ru_python",
        "text": "hello",
        "reply_to": None,
        "views": None,
        "forwards": None,
        "replies_count": None,
        "entities": [],
    }


def test_seed_example_fields_are_mapped() -> None:
    msg = _message(
        message="see https://example.com/abcdefgh now",
        from_id=types.PeerUser(4567890),
        reply_to=types.MessageReplyHeader(reply_to_msg_id=122),
        views=1234,
        forwards=12,
        replies=types.MessageReplies(replies=5, replies_pts=0),
        entities=[types.MessageEntityUrl(offset=4, length=24)],
    )
    out = message_to_dict(msg, "@ru_python")
    assert out["from_id"] == 4567890
    assert out["reply_to"] == 122
    assert (out["views"], out["forwards"], out["replies_count"]) == (1234, 12, 5)
    assert out["entities"] == [{"type": "url", "offset": 4, "length": 24}]
    assert list(out) == BASE_KEYS  # no optional key without its field


def test_text_comes_from_raw_message_not_text_property() -> None:
    msg = _message(message="**not markdown-rendered**")
    assert msg.text is None or isinstance(msg.text, str)  # needs a client; we don't use it
    assert message_to_dict(msg, "@c")["text"] == "**not markdown-rendered**"


def test_channel_author_maps_to_channel_id() -> None:
    assert message_to_dict(_message(from_id=types.PeerChannel(42)), "@c")["from_id"] == 42


def test_entity_kinds_and_their_extras() -> None:
    msg = _message(
        message="bold link mention code",
        entities=[
            types.MessageEntityBold(offset=0, length=4),
            types.MessageEntityTextUrl(offset=5, length=4, url="https://t.me/x"),
            types.MessageEntityMentionName(offset=10, length=7, user_id=777),
            types.MessageEntityBotCommand(offset=18, length=4),
            types.MessageEntityPre(offset=18, length=4, language="python"),
            types.MessageEntityCustomEmoji(offset=0, length=1, document_id=5368324170671202286),
        ],
    )
    assert message_to_dict(msg, "@c")["entities"] == [
        {"type": "bold", "offset": 0, "length": 4},
        {"type": "text_url", "offset": 5, "length": 4, "url": "https://t.me/x"},
        {"type": "mention_name", "offset": 10, "length": 7, "user_id": 777},
        {"type": "bot_command", "offset": 18, "length": 4},
        {"type": "pre", "offset": 18, "length": 4, "language": "python"},
        {"type": "custom_emoji", "offset": 0, "length": 1, "document_id": "5368324170671202286"},
    ]


def test_all_optional_fields_present_in_fixed_order() -> None:
    msg = _message(
        edit_date=WHEN + timedelta(minutes=5),
        reactions=types.MessageReactions(
            results=[
                types.ReactionCount(reaction=types.ReactionEmoji(emoticon="👍"), count=3),
                types.ReactionCount(reaction=types.ReactionCustomEmoji(document_id=99), count=2),
            ]
        ),
        media=types.MessageMediaPhoto(photo=types.PhotoEmpty(id=1)),
        fwd_from=types.MessageFwdHeader(
            date=WHEN - timedelta(days=1), from_id=types.PeerUser(55), from_name="Ann"
        ),
        grouped_id=13579,
        reply_to=types.MessageReplyHeader(
            reply_to_msg_id=120, reply_to_top_id=100, forum_topic=True
        ),
        post_author="Editor",
    )
    out = message_to_dict(msg, "@c")
    assert list(out) == [
        *BASE_KEYS,
        "edit_date",
        "reactions",
        "media",
        "fwd_from",
        "grouped_id",
        "topic_id",
        "post_author",
    ]
    assert out["edit_date"] == "2025-11-07T10:28:45Z"
    assert out["reactions"] == {"👍": 3, "99": 2}
    assert out["media"] == "photo"
    assert out["fwd_from"] == {"from_id": 55, "from_name": "Ann", "date": "2025-11-06T10:23:45Z"}
    assert out["grouped_id"] == 13579
    assert out["topic_id"] == 100
    assert out["reply_to"] == 120
    assert out["post_author"] == "Editor"


def test_message_posted_into_a_topic_takes_the_topic_from_reply_to() -> None:
    msg = _message(reply_to=types.MessageReplyHeader(reply_to_msg_id=77, forum_topic=True))
    assert message_to_dict(msg, "@c")["topic_id"] == 77


def test_plain_reply_has_no_topic() -> None:
    msg = _message(reply_to=types.MessageReplyHeader(reply_to_msg_id=77))
    assert "topic_id" not in message_to_dict(msg, "@c")


def test_empty_reactions_are_omitted() -> None:
    assert "reactions" not in message_to_dict(
        _message(reactions=types.MessageReactions(results=[])), "@c"
    )


def test_service_message_carries_its_action() -> None:
    msg = types.MessageService(
        id=5,
        peer_id=PEER,
        date=WHEN,
        action=types.MessageActionChatAddUser(users=[1, 2]),
        from_id=types.PeerUser(1),
    )
    out = message_to_dict(msg, "@c")
    assert out["action"] == "chat_add_user"
    assert out["text"] == ""
    assert out["from_id"] == 1
    assert list(out)[-1] == "action"


def _doc(*attributes: object) -> types.MessageMediaDocument:
    return types.MessageMediaDocument(
        document=types.Document(
            id=1,
            access_hash=0,
            file_reference=b"",
            date=WHEN,
            mime_type="x/y",
            size=1,
            dc_id=2,
            attributes=list(attributes),
        )
    )


@pytest.mark.parametrize(
    ("media", "kind"),
    [
        (None, None),
        (types.MessageMediaEmpty(), None),
        (types.MessageMediaPhoto(photo=types.PhotoEmpty(id=1)), "photo"),
        (_doc(types.DocumentAttributeFilename(file_name="a.pdf")), "document"),
        (_doc(types.DocumentAttributeVideo(duration=1, w=1, h=1)), "video"),
        (_doc(types.DocumentAttributeAudio(duration=1)), "audio"),
        (_doc(types.DocumentAttributeAudio(duration=1, voice=True)), "voice"),
        (
            _doc(
                types.DocumentAttributeVideo(duration=1, w=1, h=1),
                types.DocumentAttributeSticker(alt="x", stickerset=types.InputStickerSetEmpty()),
            ),
            "sticker",
        ),
        (types.MessageMediaDocument(), "document"),
        (
            types.MessageMediaPoll(
                poll=types.Poll(
                    id=1,
                    question=types.TextWithEntities(text="q", entities=[]),
                    answers=[],
                    hash=0,
                ),
                results=types.PollResults(),
            ),
            "poll",
        ),
        (types.MessageMediaGeo(geo=types.GeoPointEmpty()), "geo"),
        (
            types.MessageMediaContact(
                phone_number="", first_name="A", last_name="", vcard="", user_id=1
            ),
            "contact",
        ),
        (types.MessageMediaWebPage(webpage=types.WebPageEmpty(id=1)), "webpage"),
        (types.MessageMediaDice(value=3, emoticon="🎲"), "other"),
    ],
)
def test_media_kinds(media: object, kind: str | None) -> None:
    assert media_kind(media) == kind
    out = message_to_dict(_message(media=media), "@c")
    assert out.get("media") == kind


def test_dates_are_utc_with_z_whatever_the_input_zone() -> None:
    plus3 = timezone(timedelta(hours=3))
    msg = _message(date=datetime(2025, 11, 7, 13, 23, 45, tzinfo=plus3))
    assert message_to_dict(msg, "@c")["date"] == "2025-11-07T10:23:45Z"
    naive = _message(date=datetime(2025, 11, 7, 10, 23, 45))
    assert message_to_dict(naive, "@c")["date"] == "2025-11-07T10:23:45Z"


def test_output_is_json_serialisable_and_deterministic() -> None:
    msg = _message(
        entities=[types.MessageEntityBold(offset=0, length=5)],
        reactions=types.MessageReactions(
            results=[types.ReactionCount(reaction=types.ReactionEmoji(emoticon="🔥"), count=1)]
        ),
    )
    first = json.dumps(message_to_dict(msg, "@c"), ensure_ascii=False)
    second = json.dumps(message_to_dict(msg, "@c"), ensure_ascii=False)
    assert first == second
