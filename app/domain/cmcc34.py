"""The CMCC-34 intent taxonomy (ids, names, groups): public label names, no data rows."""

from app.domain.labels import LabelSet

CMCC34_LABELS: dict[int, str] = {
    0: "咨询（含查询）业务规定",
    1: "办理取消",
    2: "咨询（含查询）业务资费",
    3: "咨询（含查询）营销活动信息",
    4: "咨询（含查询）办理方式",
    5: "投诉（含抱怨）业务使用问题",
    6: "咨询（含查询）账户信息",
    7: "办理开通",
    8: "咨询（含查询）业务订购信息查询",
    9: "投诉（含抱怨）不知情定制问题",
    10: "咨询（含查询）产品/业务功能",
    11: "咨询（含查询）用户资料",
    12: "投诉（含抱怨）费用问题",
    13: "投诉（含抱怨）业务办理问题",
    14: "投诉（含抱怨）服务问题",
    15: "办理变更",
    16: "咨询（含查询）服务渠道信息",
    17: "投诉（含抱怨）业务规定不满",
    18: "投诉（含抱怨）营销问题",
    19: "投诉（含抱怨）网络问题",
    20: "办理停复机",
    21: "投诉（含抱怨）信息安全问题",
    22: "办理重置/修改/补发",
    23: "咨询（含查询）使用方式",
    24: "咨询（含查询）号码状态",
    25: "咨询（含查询）工单处理结果",
    26: "办理打印/邮寄",
    27: "咨询（含查询）宽带覆盖范围",
    28: "办理移机/装机/拆机",
    29: "办理缴费",
    30: "办理下载/设置",
    31: "办理补换卡",
    32: "办理销户/重开",
    33: "咨询（含查询）电商货品信息",
}

# 0 = 咨询 enquiry, 1 = 投诉 complaint, 2 = 办理 transaction
CMCC34_GROUPS: dict[int, int] = {
    i: 0 if name.startswith("咨询") else 1 if name.startswith("投诉") else 2 for i, name in CMCC34_LABELS.items()
}

CMCC34_LABEL_SET = LabelSet.from_pairs(list(CMCC34_LABELS.items()))
