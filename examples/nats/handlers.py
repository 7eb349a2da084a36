"""Handlers of the NATS example (examples/nats/run.sh): two actors of the flow `shout`."""


def upper(payload):
    """Actor `upper`: the text in capitals."""
    return {"text": payload["text"].upper()}


def count(payload):
    """Actor `count`: the text and its length."""
    return {"text": payload["text"], "length": len(payload["text"])}
