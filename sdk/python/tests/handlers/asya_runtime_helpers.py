"""What a handler author would copy: the upstream marker is a plain one-key dict."""


def upstream(payload):
    return {"__asya_upstream__": payload}
