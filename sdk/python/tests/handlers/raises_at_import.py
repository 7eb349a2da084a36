raise RuntimeError("config file not found at import time")
