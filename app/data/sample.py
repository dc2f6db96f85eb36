"""Generate the bundled sample dataset: CMCC-34 style call-centre dialogues written by this project.

No real call is copied here. Each intent has a few hand-written customer requests with slots
(plans, amounts, services); a seeded generator wraps them in agent turns joined by ``[SEP]``,
like CMCC-34's ``sentence_sep``. The result is learnable but not trivial: intents share
vocabulary (查询 / 办理 / 投诉 the same service), so a classifier must read the request.
"""

from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass

from app.domain.cmcc34 import CMCC34_GROUPS, CMCC34_LABELS

SERVICES = ["流量包", "来电显示", "彩铃", "国际漫游", "宽带", "副卡", "视频会员", "5G套餐", "家庭网", "积分兑换"]
AMOUNTS = ["十块", "二十八", "五十", "一百", "三十八", "五十八", "一百二十八"]
PLACES = ["小区", "公司", "老家", "新房子", "学校宿舍"]

# Customer requests per intent id; {svc}, {amt}, {place} are filled in at random.
REQUESTS: dict[int, list[str]] = {
    0: ["我想问一下{svc}有什么规定吗", "{svc}是不是每个月都要续订的规定", "听说{svc}有使用期限这个是怎么规定的"],
    1: ["帮我把{svc}取消掉", "我不想要{svc}了给我退订", "那个{svc}能不能现在就取消"],
    2: ["{svc}一个月多少钱", "我想问下{svc}的资费是怎么算的", "{svc}超出以后怎么收费"],
    3: ["最近有什么优惠活动吗", "我收到短信说充{amt}送话费是什么活动", "{svc}现在有没有打折活动"],
    4: ["{svc}要怎么办理", "我想开{svc}在哪里可以办", "办{svc}需要带什么材料"],
    5: ["我的{svc}用不了一直提示错误", "{svc}开了以后根本没法用", "你们这个{svc}老是出问题"],
    6: ["帮我查一下话费余额还有多少", "我账户里还剩多少钱", "查一下我这个月的账单"],
    7: ["我要开通{svc}", "帮我开一个{svc}", "{svc}给我开通一下"],
    8: ["我现在都订了哪些业务", "帮我查一下我订购了什么套餐", "我有没有订{svc}"],
    9: ["我根本没订{svc}怎么就扣钱了", "谁给我开的{svc}我都不知道", "莫名其妙多了个{svc}我没同意过"],
    10: ["{svc}都有什么功能", "{svc}能干什么", "开了{svc}以后可以用哪些功能"],
    11: ["我这个号码登记的是谁的名字", "帮我查一下我的身份证登记信息", "我的机主资料是什么"],
    12: ["这个月怎么扣了我{amt}块钱", "话费怎么突然多了{amt}", "我的费用不对多收了钱"],
    13: ["上次办{svc}到现在都没办好", "你们营业厅给我办错了{svc}", "办个{svc}拖了一个星期"],
    14: ["你们客服态度太差了", "营业员根本不理人", "打了好几次电话都没人解决我要投诉服务"],
    15: ["我想把套餐换成{amt}的", "帮我把{svc}改成别的档位", "我要变更一下我的套餐"],
    16: ["附近营业厅在哪里", "有没有网上办理的渠道", "你们的客服热线还有别的号码吗"],
    17: ["凭什么{svc}必须绑定合约", "这个规定太不合理了不能提前解约", "你们这规定我不能接受"],
    18: ["你们天天给我打营销电话烦死了", "推销{svc}的短信太多了", "营业员骗我办了{svc}说是免费的"],
    19: ["我家信号特别差打不了电话", "网速太慢了{place}根本上不了网", "{place}的宽带老是断网"],
    20: ["我的手机怎么停机了帮我复机", "我要办理停机保号", "手机丢了先帮我停机"],
    21: ["我的个人信息是不是被泄露了", "老有陌生人知道我的号码和名字", "有人冒用我的身份办卡"],
    22: ["服务密码忘了帮我重置一下", "我要修改服务密码", "发票丢了能不能补发"],
    23: ["{svc}要怎么用", "开通了{svc}不会用怎么操作", "{svc}怎么设置才能用"],
    24: ["我这个号码现在是什么状态", "帮我查下这个号是不是停机了", "我的号码还能正常用吗"],
    25: ["我上次投诉的工单处理得怎么样了", "之前报的故障有结果了吗", "工单现在进度到哪了"],
    26: ["帮我把发票邮寄到家里", "我要打印一下通话详单", "账单能不能寄给我"],
    27: ["{place}能装宽带吗", "你们宽带覆盖到{place}了吗", "查一下{place}有没有光纤"],
    28: ["我搬家了要把宽带移到{place}", "新家要装宽带", "宽带不用了帮我拆机"],
    29: ["我要交{amt}块话费", "帮我充值{amt}", "怎么给别人的号码缴费"],
    30: ["手机上网要怎么设置", "营业厅客户端在哪下载", "帮我发一下上网设置参数"],
    31: ["我的卡坏了要补一张", "换个5G卡要怎么弄", "手机卡丢了要补卡"],
    32: ["我要把这个号码注销掉", "销户要怎么办", "之前注销的号码能不能重新开"],
    33: ["我在你们商城买的手机什么时候发货", "积分商城的东西怎么还没到", "网上商城的耳机有货吗"],
}

AGENT_OPENINGS = ["您好请讲", "您好很高兴为您服务", "您好请问有什么可以帮您"]
AGENT_MIDDLES = ["好的我帮您看一下", "请问是本机号码吗", "稍等我给您查询", "嗯您说"]
CUSTOMER_FILLERS = ["对就是这个号", "是的", "嗯", "对的本机"]
AGENT_CLOSINGS = ["好的还有其他问题吗", "好的已经为您记录", "感谢您的来电再见"]
CUSTOMER_CLOSINGS = ["没有了谢谢", "好的谢谢", "行那就这样"]


@dataclass(frozen=True)
class SampleRow:
    dialogue: str
    label_id: int


def _make_dialogue(rng: random.Random, label_id: int) -> str:
    request = rng.choice(REQUESTS[label_id]).format(
        svc=rng.choice(SERVICES), amt=rng.choice(AMOUNTS), place=rng.choice(PLACES)
    )
    turns = [rng.choice(AGENT_OPENINGS), request]
    if rng.random() < 0.7:
        turns += [rng.choice(AGENT_MIDDLES), rng.choice(CUSTOMER_FILLERS)]
    turns += [rng.choice(AGENT_CLOSINGS), rng.choice(CUSTOMER_CLOSINGS)]
    return "[SEP]".join(turns)


def generate_sample_dialogues(per_label: int = 12, seed: int = 0, labels: list[int] | None = None) -> list[SampleRow]:
    """``per_label`` dialogues for each intent (all 34 by default), shuffled with ``seed``."""
    rng = random.Random(seed)
    ids = sorted(CMCC34_LABELS) if labels is None else labels
    rows = [SampleRow(_make_dialogue(rng, i), i) for i in ids for _ in range(per_label)]
    rng.shuffle(rows)
    return rows


def to_cmcc_csv(rows: list[SampleRow]) -> str:
    """The CMCC-34 CSV schema: word_mf2,label_raw,c_numerical,num_cnum,sentence_sep."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["word_mf2", "label_raw", "c_numerical", "num_cnum", "sentence_sep"])
    for row in rows:
        writer.writerow(
            [row.dialogue.replace("[SEP]", ""), CMCC34_LABELS[row.label_id], row.label_id,
             CMCC34_GROUPS[row.label_id], row.dialogue]
        )
    return out.getvalue()


def write_sample_files(directory, *, train_per_label: int = 12, validation_per_label: int = 3) -> dict:
    """Write the bundled demo files: a training and a validation CSV with different seeds."""
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "train": directory / "cmcc_style_train.csv",
        "validation": directory / "cmcc_style_validation.csv",
    }
    paths["train"].write_text(to_cmcc_csv(generate_sample_dialogues(train_per_label, seed=1)), encoding="utf-8")
    paths["validation"].write_text(to_cmcc_csv(generate_sample_dialogues(validation_per_label, seed=2)),
                                   encoding="utf-8")
    return paths


if __name__ == "__main__":
    import sys

    for kind, path in write_sample_files(sys.argv[1] if len(sys.argv) > 1 else "samples").items():
        print(f"{kind}: {path}")
