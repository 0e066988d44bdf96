# Opens N connections to 127.0.0.1:PORT, never sends a byte, and keeps N
# open: whatever the gateway closes is dialled again. Prints how many the
# first round opened, then runs until killed. Used by the flood tests
# (host/cli/tests/all/flood.rs) and `just bench` (bench/src/attack.rs).
import selectors, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
sel = selectors.DefaultSelector()
def dial():
    s = socket.socket()
    s.settimeout(0.2)
    try:
        s.connect(("127.0.0.1", port))
    except OSError:
        s.close()
        return False
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
    return True
print(sum(dial() for _ in range(n)), flush=True)
while True:
    for key, _ in sel.select(timeout=1):
        sel.unregister(key.fileobj)
        key.fileobj.close()
        dial()
