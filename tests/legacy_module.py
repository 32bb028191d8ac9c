"""A stand-in for legacy code: `checkout` calls `charge` by its module-level name."""

failures_seen = 0


def charge(customer: str, amount: int) -> str:
    global failures_seen
    if failures_seen < 2:
        failures_seen += 1
        raise ConnectionError("payment gateway reset the connection")
    return f"charged {customer} {amount}"


def checkout(customer: str, amount: int) -> str:
    return charge(customer, amount)
