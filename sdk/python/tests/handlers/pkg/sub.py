def handle(payload):
    return {"from": "pkg.sub", "payload": payload}


class Greeter(object):
    def greet(self, payload):
        return "hello %s" % payload
