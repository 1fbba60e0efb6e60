"""``spend``, ``spend-limit``, ``price`` and ``prices``: money, per organization and project."""

from __future__ import annotations

import argparse

from ratelimitd.api.wellknown import micros
from ratelimitd.cli.client import Api, resolve_project
from ratelimitd.cli.command import SubParsers, org_arg, verb_parser
from ratelimitd.cli.errors import NotUnderstood
from ratelimitd.cli.output import emit, format_usd, render
from ratelimitd.cli.pages import collect
from ratelimitd.cli.projects import project_names
from ratelimitd.v1 import usage_pb2 as upb


def spend_table(reply: upb.GetSpendResponse, names: dict[str, str]) -> str:
    rows = [
        (names.get(line.project_id, line.project_id) if line.project_id else "(organization)",
         format_usd(line.spend_usd_micros),
         format_usd(line.limit_usd_micros) if line.HasField("limit_usd_micros") else "-",
         ",".join(f"{t}%" for t in line.thresholds_crossed) or "-", "blocked" if line.blocked else "", line.project_id)
        for line in [reply.organization, *reply.projects]
    ]  # fmt: skip
    header = ("PROJECT", "SPEND USD", "LIMIT USD", "ALERTS", "STATE", "ID")
    return f"month {reply.month} (UTC)\n" + render(rows, header)


async def _emit_spend(api: Api, args: argparse.Namespace, reply: upb.GetSpendResponse) -> int:
    names = {} if args.json else await project_names(api, args.org)
    emit(args, reply, lambda: spend_table(reply, names))
    return 0


async def spend(api: Api, args: argparse.Namespace) -> int:
    reply = await api.usage.GetSpend(upb.GetSpendRequest(organization_id=args.org, month=args.month or ""))
    return await _emit_spend(api, args, reply)


async def spend_limit(api: Api, args: argparse.Namespace) -> int:
    if (args.usd is None) == (not args.clear):
        raise NotUnderstood("spend-limit: give a limit in USD or --clear, not both or neither")
    project = await resolve_project(api, args.org, args.project) if args.project else ""
    request = upb.SetSpendLimitRequest(organization_id=args.org, project_id=project)
    if args.usd is not None:
        request.limit_usd_micros = micros(args.usd)
    return await _emit_spend(api, args, await api.usage.SetSpendLimit(request))


def prices_table(prices: list[upb.Price]) -> str:
    rows = [
        (p.model, format_usd(p.input_usd_micros_per_million), format_usd(p.output_usd_micros_per_million),
         format_usd(p.cached_input_usd_micros_per_million))
        for p in prices
    ]  # fmt: skip
    return render(rows, ("MODEL", "INPUT $/M", "OUTPUT $/M", "CACHED INPUT $/M"))


async def price(api: Api, args: argparse.Namespace) -> int:
    reply = await api.usage.SetPrice(
        upb.SetPriceRequest(
            price=upb.Price(
                organization_id=args.org, model=args.model, input_usd_micros_per_million=micros(args.input),
                output_usd_micros_per_million=micros(args.output),
                cached_input_usd_micros_per_million=micros(args.cached),
            )
        )
    )  # fmt: skip
    emit(args, reply, lambda: prices_table([reply]))
    return 0


async def prices(api: Api, args: argparse.Namespace) -> int:
    listed, _ = await collect(
        lambda token, size: api.usage.ListPrices(
            upb.ListPricesRequest(organization_id=args.org, page_token=token, page_size=size)
        ),
        lambda page: page.prices,
    )
    reply = upb.ListPricesResponse(prices=listed)
    emit(args, reply, lambda: prices_table(list(reply.prices)))
    return 0


def add_parsers(sub: SubParsers) -> None:
    p = verb_parser(sub, "spend", spend, "monthly spend against the limits, with alert thresholds crossed")
    org_arg(p)
    p.add_argument("--month", help="YYYY-MM (UTC); default this month")

    p = verb_parser(sub, "spend-limit", spend_limit, "set or clear a monthly spend limit (organization or project)")
    org_arg(p)
    p.add_argument("usd", nargs="?", type=float, help="USD per calendar month (UTC)")
    p.add_argument("--project", help="a project (id or name) instead of the organization")
    p.add_argument("--clear", action="store_true", help="remove the limit instead of setting one")

    p = verb_parser(sub, "price", price, "set a model's price (USD per million tokens); model '*' is the default")
    org_arg(p)
    p.add_argument("model", help="the model, or '*' for every model without a price of its own")
    p.add_argument("--input", type=float, required=True, help="USD per million input tokens")
    p.add_argument("--output", type=float, required=True, help="USD per million output tokens")
    p.add_argument("--cached", type=float, default=0.0, help="USD per million cached input tokens (default 0)")

    p = verb_parser(sub, "prices", prices, "list model prices")
    org_arg(p)
