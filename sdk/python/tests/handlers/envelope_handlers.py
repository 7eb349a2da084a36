"""Envelope-mode handlers."""


def add_next(env):
    env["route"]["next"].append("extra")
    env["payload"] = {"seen": True}
    env["headers"]["x-note"] = "added"
    return env


def replace_next(env):
    env["route"]["next"] = ["x", "y"]
    return env


def clear_next(env):
    env["route"]["next"] = []
    return env


def change_prev(env):
    env["route"]["prev"] = ["rewritten"]
    return env


def erase_prev(env):
    env["route"]["prev"].pop()
    return env


def change_curr(env):
    env["route"]["curr"] = "someone-else"
    return env


def break_route(env):
    env["route"] = "not-a-route"
    return env


def fanout(env):
    out = []
    for i in range(2):
        child = dict(env)
        child["route"] = {"prev": list(env["route"]["prev"]), "curr": env["route"]["curr"],
                          "next": ["branch-%d" % i]}
        child["payload"] = {"branch": i}
        out.append(child)
    return out


def not_an_envelope(env):
    return 42


def abort(env):
    return None


def stream(env):
    for i in range(2):
        env["route"]["next"] = ["s-%d" % i]
        env["payload"] = i
        yield env
    env["route"]["prev"] = []
    yield env
